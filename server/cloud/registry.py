"""The models the cloud tier serves right now (:class:`ModelRegistry`), read on every request.

Per model name a :class:`~device_client.runtime.ModelHost` holds the default version (the highest
release), exactly as on a device: a new one is loaded, validated and warmed beside it and swapped
in by rebinding one reference, and the replaced one stays warm as the host's previous model.
Pinned versions (``name@version``) are kept beside it. The table itself is an immutable mapping
replaced whole, so a request reads one consistent view and finishes on the model it started with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from device_client.runtime import LoadedModel, ModelHost


@dataclass(frozen=True)
class ServedModel:
    """One model name: its host (serving the default version) and the other versions served."""

    host: ModelHost
    #: version -> model, the versions served besides the default (the host's serving one)
    others: Mapping[str, LoadedModel] = field(default_factory=dict)

    @property
    def default(self) -> LoadedModel | None:
        return self.host.serving

    def get(self, version: str | None) -> LoadedModel | None:
        """The model answering ``version`` (None: the default)."""
        serving = self.host.serving
        if version is None or (serving is not None and serving.version == version):
            return serving
        return self.others.get(version)

    def versions(self) -> list[LoadedModel]:
        """Every served version, highest release first."""
        found = {m.version: m for m in self.others.values()}
        if self.host.serving is not None:
            found[self.host.serving.version] = self.host.serving
        return sorted(found.values(), key=lambda m: m.manifest.release, reverse=True)


class ModelRegistry:
    """The table of served models; written by one thread (the repository sync), read by all."""

    def __init__(self) -> None:
        self._models: Mapping[str, ServedModel] = MappingProxyType({})
        #: set once the first refresh (or the fallback to installed bundles) has run
        self.synced = False

    @property
    def models(self) -> Mapping[str, ServedModel]:
        return self._models

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def lookup(self, name: str, version: str | None = None) -> LoadedModel | None:
        served = self._models.get(name)
        return served.get(version) if served is not None else None

    def publish(self, models: Mapping[str, ServedModel]) -> None:
        """Replace the table (one reference assignment)."""
        self._models = MappingProxyType(dict(models))

    def loaded(self) -> dict[str, list[str]]:
        """Served versions by model name, highest release first."""
        return {name: [m.version for m in s.versions()] for name, s in sorted(self._models.items())}
