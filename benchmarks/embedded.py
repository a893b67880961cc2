"""The embedded deployment for benchmarks: uvicorn API and workers as subprocesses.

Each process runs in its own process group with its log in the data dir; SQLite store and broker
under the given folder, every other setting at its default.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """The embedded deployment's processes, each in its own process group, logs in the data dir."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.env = {
            **os.environ,
            "NORMCORE_DATA_DIR": str(data),
            "NORMCORE_DATABASE_URL": f"sqlite:///{data / 'normcore.db'}",
            "NORMCORE_BROKER_URL": f"sqla+sqlite:///{data / 'broker.db'}",
            "NORMCORE_ARTIFACT_DIR": str(data / "artifacts"),
            "NORMCORE_DATA_ROOT": str(data / "datasets"),
            "PYTHONUNBUFFERED": "1",
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []

    def _start(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.data / log, "ab") as out:
            proc = subprocess.Popen(
                args,
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start_api(self, port: int) -> str:
        """Start uvicorn on ``port`` and wait for /healthz."""
        api = self._start(
            [sys.executable, "-m", "uvicorn", "service.api.app:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
             "--no-access-log"],
            "api.log",
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and api.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return url
            time.sleep(0.2)
        raise RuntimeError("the API did not start:\n" + (self.data / "api.log").read_text()[-3000:])

    def start_worker(self) -> subprocess.Popen[bytes]:
        """``python -m worker --api-beside`` with its default queues, as ``normcore serve``
        starts it: the default training thread count keeps a core for the API."""
        worker = self._start(
            [sys.executable, "-m", "worker", "--api-beside"], f"worker{len(self.workers)}.log"
        )
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        """SIGTERM every process group we started, then SIGKILL what is left."""
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            for proc in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            for proc in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)
