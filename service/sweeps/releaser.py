"""The releaser: a daemon thread in the API process that submits a sweep's next runs.

A sweep keeps at most ``concurrency`` children queued or running; when one ends, the next
round (every ``reaper_interval_seconds``) submits the next run through the ordinary submit
path (:func:`service.sweeps.ops.release_all`). Several releasers (several API processes) are
harmless: runs are reserved under the sweep's row lock and submitted with a per-run
Idempotency-Key.
"""

from __future__ import annotations

import logging
import threading

from service.settings import Settings
from service.store import Store
from service.sweeps.ops import release_all

log = logging.getLogger("service.sweeps")


class Releaser:
    """Runs ``release_all`` every ``settings.reaper_interval_seconds`` until stopped."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="normcore-sweeps", daemon=True)

    def start(self) -> None:
        """Start the loop."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to end and wait for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reaper_interval_seconds):
            try:
                release_all(self.store, self.settings)
            except Exception as exc:  # store down: try again next round
                log.warning("sweep releaser: %r", exc)
