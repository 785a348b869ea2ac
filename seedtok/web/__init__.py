"""The demo web app (`create_app`, `serve`) and the engine behind it and the demo report (`Engine`).

FastAPI is imported only by `seedtok.web.app`, so the demo report needs none of the server's packages."""

from .engine import ABILITIES, Engine, image_from_bytes

__all__ = ["ABILITIES", "Engine", "ServerThread", "create_app", "image_from_bytes", "serve"]


def create_app(engine, **kwargs):
    from .app import create_app as _create

    return _create(engine, **kwargs)


def __getattr__(name):
    if name in ("ServerThread", "serve"):
        from . import server

        return getattr(server, name)
    raise AttributeError(name)
