"""The API process of ``normcore serve``: uvicorn serving the app on a socket the supervisor holds.

``normcore serve`` runs ``run`` in a process forked from a fork server that has already imported
the app's modules (torch among them: seconds on a loaded machine), so a restarted API answers
within about a second instead of paying those imports again.
"""

from __future__ import annotations

import os
import socket
import sys

# Imported once by the fork server; every API process forked from it starts with them loaded.
PRELOAD = ("uvicorn", "service.api.app", "normcore.factory", "normcore.models")
APP = "service.api.app:create_app"
STARTUP_FAILURE = 3  # uvicorn's own exit code when the app does not start


def run(sock: socket.socket) -> None:
    """Serve the API on ``sock`` (a listening TCP socket) until SIGTERM or SIGINT.

    Becomes a session (and process group) leader first, like the supervisor's other children.
    Exits with code 3 when the app fails to start (as the ``uvicorn`` command does).
    """
    os.setsid()
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(APP, factory=True))
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)
