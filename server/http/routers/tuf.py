"""Read-only TUF image repository: /tuf/metadata and /tuf/targets (being implemented)."""

from fastapi import APIRouter

router = APIRouter(tags=["tuf"])
