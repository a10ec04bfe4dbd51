"""The OpenAI-compatible server: `tokenmill serve`, or `build_app(engine, ServerConfig(...))` in code."""
from tokenmill.server.api import ServerConfig, build_app, serve

__all__ = ["ServerConfig", "build_app", "serve"]
