"""Name patterns of the wire contract: ML model names, variants and versions (semver).

ASCII classes only (``\\d`` would take any Unicode digit: fullwidth, Arabic-Indic...). They serve as
pydantic ``pattern=`` constraints, which pydantic-core runs with the Rust regex engine, where ``$``
matches only at the very end; in Python, use the compiled ``*_RE`` below with ``fullmatch``:
Python's ``$`` also matches before a final newline ("clf\\n").
"""

from __future__ import annotations

import re

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
VARIANT_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,31}$"
#: semver 2.0.0 (https://semver.org), without a leading "v"
SEMVER_PATTERN = (
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)"
    r"(?:\.(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
MODEL_NAME_RE = re.compile(MODEL_NAME_PATTERN, re.ASCII)
VARIANT_RE = re.compile(VARIANT_PATTERN, re.ASCII)
SEMVER_RE = re.compile(SEMVER_PATTERN, re.ASCII)
