"""Process-local counters rendered in the Prometheus text format at ``/metrics``.

Counters of the server's ingest worker processes (:mod:`server.mqtt.workers`) arrive as snapshots
(:meth:`Metrics.snapshot` in the child, :meth:`Metrics.merge_source` here) and are added to the
server's own, so ``/metrics`` shows one set of counters however the work is split.
"""

from __future__ import annotations

import threading
from collections import defaultdict

Key = tuple[str, tuple[tuple[str, str], ...]]
#: (counters, help texts) of one process
Snapshot = tuple[dict[Key, float], dict[str, str]]


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[Key, float] = defaultdict(float)
        self._help: dict[str, str] = {}
        self._sources: dict[str, dict[Key, float]] = {}

    def inc(self, name: str, amount: float = 1.0, help: str = "", **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] += amount
            if help:
                self._help.setdefault(name, help)

    def _value(self, key: Key) -> float:
        return self._counters.get(key, 0.0) + sum(s.get(key, 0.0) for s in self._sources.values())

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._value((name, tuple(sorted(labels.items()))))

    def total(self, name: str) -> float:
        with self._lock:
            keys = {k for k in self._counters if k[0] == name}
            keys.update(k for s in self._sources.values() for k in s if k[0] == name)
            return sum(self._value(k) for k in keys)

    # -- counters of other processes -----------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """This process's own counters and help texts (what a worker process sends its server)."""
        with self._lock:
            return dict(self._counters), dict(self._help)

    def merge_source(self, source: str, snapshot: Snapshot) -> None:
        """Counters of ``source`` (a worker process), replacing that source's previous snapshot."""
        counters, helps = snapshot
        with self._lock:
            self._sources[source] = dict(counters)
            for name, text in helps.items():
                self._help.setdefault(name, text)

    def retire_source(self, source: str) -> None:
        """``source`` is gone: its last counts become this process's own (a successor starts
        again from zero and counters never go down)."""
        with self._lock:
            for key, value in self._sources.pop(source, {}).items():
                self._counters[key] += value

    def render(self) -> str:
        with self._lock:
            keys = set(self._counters).union(*self._sources.values())
            items = sorted((k, self._value(k)) for k in keys)
            helps = dict(self._help)
        lines: list[str] = []
        seen: set[str] = set()
        for (name, labels), value in items:
            if name not in seen:
                seen.add(name)
                if name in helps:
                    lines.append(f"# HELP {name} {helps[name]}")
                lines.append(f"# TYPE {name} counter")
            label_text = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")
        return "\n".join(lines) + "\n"
