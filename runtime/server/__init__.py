"""OpenAI-compatible HTTP server (needs the `server` extra: fastapi, uvicorn, pydantic)."""

from .app import create_app, serve
from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve"]
