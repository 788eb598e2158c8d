"""Everything a running server holds: settings, database, CA, director, image repository.

Built once in the app lifespan (or by a CLI command); never a module global.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

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


@dataclass
class ServerContext:
    settings: Settings
    db: Database
    ca: FleetCA
    director: Director
    repo: ImageRepository
    metrics: Metrics = field(default_factory=Metrics)

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
