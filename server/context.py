"""Everything a running server holds: settings, database, CA, director, image repository, and
the broker actions the domain may trigger (:class:`BrokerControl`).

Built once in the app lifespan (or by a CLI command); never a module global.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from server.config import Settings
from server.db import Database
from server.metrics import Metrics
from server.migrate import upgrade_head
from server.trust.director import Director
from server.trust.keys import secure_key_dir
from server.trust.local_repo import image_repository
from server.trust.pki import FleetCA
from server.trust.repository import ImageRepository

log = logging.getLogger(__name__)


class BrokerControl(Protocol):
    """What the domain asks of the MQTT broker after a revocation. The app wires the broker on this
    host (:class:`server.mqtt.control.LocalBroker`); the domain never imports :mod:`server.mqtt`."""

    def reload_crl(self) -> int:
        """Make the brokers running the generated configuration re-read its CRL; how many were told."""
        ...

    def cut(self, device_id: str) -> None:
        """Close the open connection of ``device_id``, in the background."""
        ...


class NoBroker:
    """No broker to act on (a CLI command, an ingest process): nothing is reloaded or cut."""

    def reload_crl(self) -> int:
        return 0

    def cut(self, device_id: str) -> None:
        return None


@dataclass
class ServerContext:
    settings: Settings
    db: Database
    ca: FleetCA
    director: Director
    repo: ImageRepository
    metrics: Metrics = field(default_factory=Metrics)
    broker: BrokerControl = field(default_factory=NoBroker)

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool = True) -> ServerContext:
        """Create directories and keys on first use, migrate the database, open everything."""
        for d in (settings.data_dir, settings.repo_dir):
            d.mkdir(parents=True, exist_ok=True)
        secure_key_dir(settings.key_dir)
        if migrate:
            upgrade_head(settings.database_url)
        repo = image_repository(settings)
        repo.initialize()
        return cls(
            settings=settings,
            db=Database(settings.database_url),
            ca=FleetCA(settings.key_dir),
            director=Director(settings.key_dir),
            repo=repo,
        )

    @classmethod
    def attach(cls, settings: Settings) -> ServerContext:
        """The context of a worker process beside a running server (:mod:`server.mqtt.workers`):
        the same database and keys, nothing created, migrated or re-signed (the server did that)."""
        return cls(
            settings=settings,
            db=Database(settings.database_url),
            ca=FleetCA(settings.key_dir),
            director=Director(settings.key_dir),
            repo=ImageRepository(settings.repo_dir, settings.key_dir),
        )

    def close(self) -> None:
        self.db.dispose()
