"""TUF image repository (python-tuf ``tuf.api.metadata``). Being implemented: see server/catalog."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class ImageRepository:
    def __init__(self, repo_dir: Path, key_dir: Path, **expiry_seconds: int) -> None:
        self.repo_dir = repo_dir
        self.key_dir = key_dir

    def initialize(self) -> None:
        raise NotImplementedError

    def trusted_root(self) -> dict[str, Any]:
        raise NotImplementedError

    def refresh_expiring(self) -> list[str]:
        raise NotImplementedError
