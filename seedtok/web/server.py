"""Serving the app with uvicorn: in the foreground (`serve`, the ``seedtok serve`` verb) or on a background
thread (`ServerThread`, for tests and embedding)."""

from __future__ import annotations

import socket
import threading
import time

from ..errors import SeedtokError


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (uvicorn handles Ctrl-C and SIGTERM)."""
    import uvicorn

    sock = _bind(host, port)  # bind first: a port in use is one clear error, not a uvicorn traceback
    print(f"seedtok: serving on http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}/ "
          f"(API: /api, schema: /api/openapi.json; Ctrl-C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])


class ServerThread:
    """uvicorn on a daemon thread, on a free loopback port by default; a context manager.

        with ServerThread(create_app(engine)) as server:
            httpx.get(server.url + "/api/info")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0):
        import uvicorn

        self.sock = _bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        # not the main thread: uvicorn installs no signal handlers here
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"seedtok-web-{self.port}")
        self.start_timeout = start_timeout

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise SeedtokError(f"the web server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SeedtokError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
