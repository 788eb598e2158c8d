"""Model registry: push, list, read and revoke model versions (being implemented)."""

from fastapi import APIRouter

router = APIRouter(prefix="/api/v1", tags=["models"])
