"""How a model version behaves on simulated devices (:class:`Profile`), and the options of a
simulated fleet (:class:`SimOptions`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace


@dataclass(frozen=True)
class Profile:
    """Behaviour of one version (or the default for every version without its own profile).

    Times are seconds; rates are probabilities per device (install failures, probation reverts) or
    per request (``error_rate``).
    """

    download_s: float = 0.0
    verify_s: float = 0.0
    install_s: float = 0.0
    #: probation length; None = what the DesiredState asks for (``probation.seconds``)
    probation_s: float | None = None
    fail_rate: float = 0.0
    revert_rate: float = 0.0
    error_rate: float = 0.0
    p50_ms: float = 4.0
    p95_ms: float = 8.0
    agreement: float = 1.0
    #: inference requests per second each device serves (for health windows)
    rps: float = 10.0

    def probation_for(self, requested: float) -> float:
        return requested if self.probation_s is None else self.probation_s


_FIELDS = {f.name: f for f in fields(Profile)}
_ALIASES = {
    "download": "download_s",
    "verify": "verify_s",
    "install": "install_s",
    "probation": "probation_s",
    "fail": "fail_rate",
    "revert": "revert_rate",
    "errors": "error_rate",
    "p95": "p95_ms",
    "p50": "p50_ms",
}


def parse_profile(text: str, base: Profile | None = None) -> tuple[str, Profile]:
    """``VERSION:key=value,...`` (or ``*:...`` for the default) into ``(version, Profile)``.

    Keys are the :class:`Profile` fields or their short forms (``download``, ``install``,
    ``probation``, ``fail``, ``revert``, ``errors``, ``p95``, ``p50``)."""
    version, sep, rest = text.partition(":")
    if not sep or not version:
        raise ValueError(f"invalid profile {text!r}: expected VERSION:key=value,...")
    values: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        name = _ALIASES.get(key.strip(), key.strip())
        if not eq or name not in _FIELDS:
            raise ValueError(f"invalid profile setting {part!r} (known: {', '.join(sorted(_FIELDS))})")
        values[name] = float(value)
    return version.strip(), replace(base or Profile(), **values)


@dataclass
class SimOptions:
    """How a simulated fleet runs: its worker processes, how its devices behave and connect."""

    processes: int = 0  # 0 = one per 2,500 devices, at most the CPU count
    profiles: dict[str, Profile] = field(default_factory=dict)
    default_profile: Profile = field(default_factory=Profile)
    #: what every device serves at start: {model: version}
    serving: dict[str, str] = field(default_factory=dict)
    #: seconds between health windows (0 = none)
    health_window_s: float = 10.0
    seed: int = 0
    connect_threads: int = 8
    keepalive_s: int = 60
