"""Which models the cloud tier serves (pure): the rule of ``FLEET_CLOUD_MODELS`` applied to the
targets the image repository lists.

``FLEET_CLOUD_MODELS`` names models, comma-separated: ``detector`` serves the highest release of
``detector`` that the repository lists, ``detector@1.2.0`` serves version 1.2.0 as well, for callers
that name it (``/v2/models/detector/versions/1.2.0/infer``). Only targets of one variant
(``FLEET_CLOUD_VARIANT``, ``default``) count. A revoked version is no longer listed, so it drops
out, and the next highest release becomes the default.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from device_client.protocol.messages import MODEL_NAME_RE, SEMVER_RE


@dataclass(frozen=True)
class ModelSpec:
    """One entry of ``FLEET_CLOUD_MODELS``: a model, its highest release (``latest``), and versions
    pinned besides it."""

    name: str
    latest: bool
    pinned: frozenset[str]


@dataclass(frozen=True)
class Candidate:
    """A listed target the rule selects: where it is and what it claims (its custom fields)."""

    path: str
    model: str
    version: str
    release: int
    variant: str
    length: int
    sha256: str


def parse_model_specs(entries: Iterable[str]) -> dict[str, ModelSpec]:
    """``["a", "b@1.0.0", "b@1.1.0"]`` -> specs by model name; ValueError names a bad entry."""
    latest: dict[str, bool] = {}
    pinned: dict[str, set[str]] = {}
    for raw in entries:
        entry = raw.strip()
        name, sep, version = entry.partition("@")
        if not MODEL_NAME_RE.fullmatch(name) or (sep and not SEMVER_RE.fullmatch(version)):
            raise ValueError(f"invalid cloud model {entry!r}: expected NAME or NAME@VERSION (SemVer)")
        latest.setdefault(name, False)
        pinned.setdefault(name, set())
        if sep:
            pinned[name].add(version)
        else:
            latest[name] = True
    return {n: ModelSpec(n, latest[n], frozenset(pinned[n])) for n in latest}


def _candidate(path: str, length: int, hashes: Mapping[str, str], custom: Any) -> Candidate | None:
    if not isinstance(custom, dict):
        return None
    model, version, release, variant = (custom.get(k) for k in ("model", "version", "release", "variant"))
    sha256 = hashes.get("sha256")
    if not (isinstance(model, str) and isinstance(version, str) and isinstance(variant, str)):
        return None
    if isinstance(release, bool) or not isinstance(release, int) or not isinstance(sha256, str):
        return None
    return Candidate(path, model, version, release, variant, length, sha256)


def select(
    listed: Mapping[str, tuple[int, Mapping[str, str], Any]],
    specs: Mapping[str, ModelSpec],
    variant: str,
) -> dict[str, list[Candidate]]:
    """The targets to serve, by model name, highest release first (the first is the default).

    ``listed`` maps each target path to ``(length, hashes, custom)``. A model with nothing to serve
    is absent. Targets whose custom fields are not a model bundle's (the director key list) are
    ignored."""
    by_model: dict[str, list[Candidate]] = {}
    for path, (length, hashes, custom) in listed.items():
        c = _candidate(path, length, hashes, custom)
        if c is None or c.variant != variant or c.model not in specs:
            continue
        by_model.setdefault(c.model, []).append(c)
    chosen: dict[str, list[Candidate]] = {}
    for name, found in by_model.items():
        spec = specs[name]
        found.sort(key=lambda c: c.release, reverse=True)
        keep = [c for i, c in enumerate(found) if (spec.latest and i == 0) or c.version in spec.pinned]
        if keep:
            chosen[name] = keep
    return chosen
