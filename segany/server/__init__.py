"""The data engine's annotation server and browser tool (`segany serve`)."""
from .app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
