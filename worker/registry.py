"""The worker's row in the store's workers table: registered at start, refreshed by heartbeat.

``GET /workers`` shows the rows to admins, and the API reads them at submit to refuse a CUDA job
that asks for more GPUs than any live gpu worker has (or to leave it queued with a reason while
no gpu worker is live). The GPUs are counted in a throwaway subprocess (``probe_gpus``), so CUDA
is never initialised in the Celery process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field

from service.settings import Settings
from service.store import Store

log = logging.getLogger("worker.registry")

_GPU_PROBE = (
    "import json, torch\n"
    "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
    "print(json.dumps({'count': n, 'names': [torch.cuda.get_device_name(i) for i in range(n)]}))\n"
)
PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class GpuInfo:
    """What the GPU probe found: how many CUDA devices and their names."""

    count: int = 0
    names: list[str] = field(default_factory=list)


def probe_gpus() -> GpuInfo:
    """Count the CUDA devices torch sees, in a subprocess so CUDA never starts in this one.

    Any failure (no torch, a broken driver, a timeout) reads as no GPU.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-c", _GPU_PROBE],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            return GpuInfo()
        doc = json.loads(done.stdout.strip().splitlines()[-1])
        return GpuInfo(int(doc["count"]), [str(n) for n in doc["names"]])
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, IndexError):
        return GpuInfo()


def host_memory_bytes() -> int | None:
    """Physical memory of this host, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _version() -> str | None:
    try:
        import normcore  # the package itself is cheap: torch loads only on first use

        return str(normcore.__version__)
    except Exception:
        return None


class WorkerRegistry:
    """Registers this worker and refreshes its heartbeat from a daemon thread.

    ``gpus`` may be None (not probed yet): the row then says 0 GPUs and the thread probes in the
    background and registers again with the count, so a CPU-only worker starts without waiting
    for torch to import. A row that disappears (deleted by an admin) is registered again.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        name: str,
        queues: list[str],
        gpus: GpuInfo | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.name = name
        self.queues = list(queues)
        self.gpus = gpus
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="normcore-registry", daemon=True)

    def register(self) -> None:
        """Insert or replace this worker's row (heartbeat now)."""
        gpus = self.gpus or GpuInfo()
        self.store.register_worker(
            self.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            gpus=gpus.count,
            gpu_names=gpus.names,
            memory_bytes=host_memory_bytes(),
            queues=self.queues,
            version=_version(),
        )

    def start(self) -> None:
        """Register now (a store error is logged, the thread retries) and start heartbeating."""
        try:
            self.register()
        except Exception as exc:
            log.warning("worker registry: register failed, will retry: %r", exc)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop heartbeating and remove this worker's row."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        try:
            self.store.remove_worker(self.name)
        except Exception as exc:
            log.warning("worker registry: could not remove %s: %r", self.name, exc)

    def _run(self) -> None:
        if self.gpus is None:
            self.gpus = probe_gpus()
            if self._stop.is_set():
                return
            self._register_quietly()
        while not self._stop.wait(self.settings.worker_heartbeat_seconds):
            try:
                if not self.store.worker_heartbeat(self.name):
                    self.register()
            except Exception as exc:  # the store is down: try again next beat
                log.warning("worker registry: heartbeat failed: %r", exc)

    def _register_quietly(self) -> None:
        try:
            self.register()
        except Exception as exc:
            log.warning("worker registry: register failed, will retry: %r", exc)
