"""The server's image repository as the FLEET_* settings describe it: the same directories and
metadata lifetimes for the running server (:class:`server.context.ServerContext`) and for the key
commands run on the server host (``fleet keys ...``)."""

from __future__ import annotations

from server.config import Settings
from server.trust.repository import ImageRepository


class NoImageRepository(Exception):
    """The settings point at a directory that holds no image repository yet."""


def image_repository(settings: Settings) -> ImageRepository:
    """The image repository of ``settings`` (nothing is created or signed here)."""
    return ImageRepository(
        settings.repo_dir,
        settings.key_dir,
        root_expiry_s=settings.root_expiry_s,
        targets_expiry_s=settings.targets_expiry_s,
        snapshot_expiry_s=settings.snapshot_expiry_s,
        timestamp_expiry_s=settings.timestamp_expiry_s,
    )


def existing_image_repository(settings: Settings) -> ImageRepository:
    """The image repository of ``settings``, which a server must have initialised before; raises
    :class:`NoImageRepository` when it has not."""
    repo = image_repository(settings)
    if not (settings.repo_dir / "metadata").is_dir():
        raise NoImageRepository(
            f"no image repository in {settings.repo_dir} (start the server once, or set FLEET_DATA_DIR)"
        )
    return repo
