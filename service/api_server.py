"""The API process of ``normcore serve``: uvicorn serving the app on a socket the supervisor holds.

``normcore serve`` runs ``run`` in a process forked from a fork server that has already imported
the app's modules, so a restarted API answers within about a second instead of paying those
imports again. torch is not among them: the API needs it only to check a submitted spec
(``normcore.factory``, ``normcore.models``), and imports it in the background once it answers
(``service.api.app``), so ``/healthz`` does not wait seconds for it.
"""

from __future__ import annotations

import os
import socket
import sys

# Imported once by the fork server; every API process forked from it starts with them loaded.
PRELOAD = ("uvicorn", "service.api.app")
APP = "service.api.app:create_app"
STARTUP_FAILURE = 3  # uvicorn's own exit code when the app does not start


def run(sock: socket.socket) -> None:
    """Serve the API on ``sock`` (a listening TCP socket) until SIGTERM or SIGINT.

    The access log is off unless ``NORMCORE_ACCESS_LOG=true`` (``Settings.access_log``).

    Becomes a session (and process group) leader first, like the supervisor's other children.
    Exits with code 3 when the app fails to start (as the ``uvicorn`` command does).
    """
    os.setsid()
    import uvicorn

    from service.settings import get_settings

    config = uvicorn.Config(APP, factory=True, access_log=get_settings().access_log)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)
