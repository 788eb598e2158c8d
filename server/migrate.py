"""Run Alembic migrations programmatically (``fleet server run`` and the tests do this)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_head(url: str) -> None:
    """Bring the database at ``url`` to the newest schema."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), "head")


def head_revisions() -> set[str]:
    """The newest revision(s) of the migration scripts (what ``upgrade head`` reaches)."""
    return set(ScriptDirectory(str(MIGRATIONS_DIR)).get_heads())


def current_revisions(connection: Connection) -> set[str]:
    """The revision(s) the database at ``connection`` is at (empty: never migrated)."""
    return set(MigrationContext.configure(connection).get_current_heads())
