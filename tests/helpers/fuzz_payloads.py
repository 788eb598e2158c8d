"""Malformed MQTT payloads: random bytes, truncated JSON, wrong types, huge strings, deep nesting.

:func:`corpus` is deterministic (a seeded ``random.Random``) and every payload it yields is
invalid by construction for the topic kind it targets, so a test can demand that each one is
rejected exactly once.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

NOW = datetime(2030, 1, 1, tzinfo=UTC).isoformat()


def valid(kind: str, device_id: str) -> dict[str, Any]:
    """A valid payload of ``kind`` (desired: the unsigned DesiredState body)."""
    if kind == "report":
        return {
            "schema": "fleet.report/1",
            "device_id": device_id,
            "seq": 10**12,
            "at": NOW,
            "phase": "failed",
        }
    if kind == "health":
        return {
            "schema": "fleet.health/1",
            "device_id": device_id,
            "seq": 10**12,
            "at": NOW,
            "window_s": 1.0,
            "model": "clf",
            "version": "1.0.0",
            "requests": 1,
            "errors": 0,
        }
    if kind == "presence":
        return {"schema": "fleet.presence/1", "device_id": device_id, "status": "online"}
    if kind == "desired":
        return {
            "schema": "fleet.desired/1",
            "device_id": device_id,
            "seq": 10**12,
            "issued_at": NOW,
            "expires_at": NOW,
            "model": "clf",
            "version": "1.0.0",
            "release": 1,
            "target": "clf/1.0.0/default/bundle.tar",
            "length": 1,
            "hashes": {"sha256": "ab" * 32},
        }
    raise ValueError(kind)


#: values no lax pydantic coercion turns into a valid one, per required field
BAD_VALUES: dict[str, list[Any]] = {
    "schema": [None, 1, [], {}, "fleet.report/999", ""],
    "device_id": [None, 5, [], {}, "UPPER", "a/b", "+", "#", "x" * 200],
    "seq": [None, "x", [], {}, 1.5, -3, 0],
    "at": [None, "yesterday", [], {}],
    "phase": [None, "exploded", 3, []],
    "status": [None, "maybe", 1, []],
    "window_s": [None, "long", -1, 0, []],
    "requests": [None, "many", -1, 2.5, []],
    "model": [None, 7, [], {}],
    "release": [None, "x", 0, -1, 1.5],
    "hashes": [None, "sha", 5, []],
    "issued_at": [None, "now", []],
}


def _nest(depth: int) -> str:
    return "[" * depth + "]" * depth


def corpus(kind: str, device_id: str, n: int = 40, seed: int = 5) -> Iterator[bytes]:
    """``n`` random invalid payloads for ``kind`` plus fixed nasty ones."""
    rng = random.Random(seed)
    good = valid(kind, device_id)
    text = json.dumps(good)
    yield b""
    yield b"\xff\xfe\x00garbage"
    yield b"null"
    yield b"[1, 2, 3]"
    yield b'"a string"'
    yield b"[" * 60_000  # deep nesting: beyond the JSON decoder's recursion limit
    yield (text[:-1] + ', "extra": ' + _nest(20_000) + "}").encode()  # deep inside a valid object
    yield json.dumps({**good, "model": "x" * 70_000}).encode()  # beyond MAX_PAYLOAD_BYTES
    yield json.dumps({**good, "device_id": float("nan")}).encode()  # NaN is not JSON, Python reads it
    yield (text[:-1] + ', "device_id": 5}').encode()  # a duplicate key: the last one wins
    fields = [f for f in BAD_VALUES if f in good]
    for _ in range(n):
        choice = rng.randrange(4)
        if choice == 0:
            yield rng.randbytes(rng.randrange(1, 2000))
        elif choice == 1:
            yield text[: rng.randrange(1, len(text))].encode()  # a strict prefix is never JSON
        elif choice == 2:
            field = rng.choice(fields)
            yield json.dumps({**good, field: rng.choice(BAD_VALUES[field])}).encode()
        else:
            mangled = dict(good)
            mangled.pop(rng.choice(fields))
            yield json.dumps(mangled).encode()
