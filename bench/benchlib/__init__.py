"""Shared helpers of the benchmarks (a package, so `make bench`'s bench/*.py loop skips it)."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"


def write_result(name: str, data: dict[str, Any]) -> Path:
    """bench/results/<name>.json (gitignored), with when and where it ran."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "bench": name,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1, default=str))
    return path


def ratio_line(label: str, value: float | None, target: str) -> str:
    shown = "n/a" if value is None else f"{value:.3f}"
    return f"  {label}: {shown}   (DESIGN.md target: {target})"
