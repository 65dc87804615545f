"""Serve the shop on loopback from a background thread (the demo and the metrics picture)."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn


class Served:
    """An app served by uvicorn in a daemon thread: `base_url`, `wait()`, `stop()`."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread
        port = server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"

    def wait(self) -> None:
        """Until the server stops (Ctrl-C)."""
        self.thread.join()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve_in_background(app: Any, *, port: int = 0, timeout: float = 30.0) -> Served | None:
    """Serve `app` on 127.0.0.1:`port` (0: any free port); None if it did not start in time."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            access_log=False, lifespan="off")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)  # waiting for uvicorn's startup flag, bounded
    if not server.started:
        return None
    return Served(server, thread)
