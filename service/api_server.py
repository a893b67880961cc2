"""The API process of ``normcore serve``: uvicorn serving the app on a socket the supervisor holds.

``normcore serve`` runs ``run`` in a process forked from a fork server that has already imported
the app's modules, so a restarted API answers within about a second instead of paying those
imports again. torch is not among them: the API needs it only to check a submitted spec
(``normcore.factory``, ``normcore.models``), and imports it in the background once it answers
(``service.api.app``), so ``/healthz`` does not wait seconds for it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

# Imported once by the fork server; every API process forked from it starts with them loaded.
PRELOAD = ("uvicorn", "service.api.app")
APP = "service.api.app:create_app"
STARTUP_FAILURE = 3  # uvicorn's own exit code when the app does not start
STOP_GRACE = 15.0  # seconds from SIGTERM to SIGKILL, as the supervisor's stop gives the API


def run(sock: socket.socket) -> None:
    """Serve the API on ``sock`` (a listening TCP socket) until SIGTERM or SIGINT.

    The access log is off unless ``NORMCORE_ACCESS_LOG=true`` (``Settings.access_log``).

    Becomes a session (and process group) leader first, like the supervisor's other children,
    and stops (SIGTERM, SIGKILL ``STOP_GRACE`` seconds later) once its parent, the supervisor's
    fork server, is gone: that server exits when the supervisor dies, even of kill -9.
    Exits with code 3 when the app fails to start (as the ``uvicorn`` command does).
    """
    os.setsid()
    _release_fork_server()
    from normcore.procs import die_with_parent

    die_with_parent(os.getppid(), "the API", STOP_GRACE)
    import uvicorn

    from service.settings import get_settings

    config = uvicorn.Config(APP, factory=True, access_log=get_settings().access_log)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def _release_fork_server() -> None:
    """Close this process's copy of the fork server's "alive" pipe.

    multiprocessing hands every forked child the write end of the pipe whose EOF tells the fork
    server that the process that started it (the supervisor) is gone. Kept open here, the server
    would outlive a killed supervisor for as long as this process runs, and this process, which
    stops when its parent (that server) exits, would never stop. The API forks no processes of
    its own, so it needs no fork server. ``_forkserver_alive_fd`` is private (CPython 3.8-3.13).
    """
    from multiprocessing import forkserver

    server = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None
