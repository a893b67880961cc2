"""Followers of a job whose worker is killed mid-epoch, against the real embedded deployment.

Four followers read the job while it runs: ``Client.iter_metrics`` (final rows, the default),
``Client.iter_metrics(final=False)`` (live rows), and ``GET /jobs/{id}/events`` with
``final=true`` and without, each SSE reader dropping its connection once after the kill and
reconnecting with ``Last-Event-ID``. Once rows past the first checkpoint are stored, the training
process is frozen (SIGSTOP) until the live followers have read them, then the worker's process
group and the training process are SIGKILLed; a second worker (started while the first trained)
resumes the job from that checkpoint and rewrites those rows. Then:

- the final followers got each (split, step) once and exactly the finished job's history;
- the live followers got every rewritten row again as a recognisable replacement (``replaces`` is
  the seq they already had for that (split, step), ``attempt`` is larger), and keyed by
  (split, step) with later rows overwriting, their rows equal the history too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from normcore.client import Client
from service.store import Store
from tests.harness import ServiceEnv, Stack, make_env, running_stack, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("e2e-follow-resume")]

STEPS_PER_EPOCH = 25  # 1024 samples, a fifth held out for val, batches of 32
# About a second an epoch at one torch thread: a window of rows past each checkpoint to kill in
# (four epochs, three such windows: with two, a quiet machine could finish before the freeze).
SPEC: dict[str, Any] = {
    "name": "follow-resume",
    "model": {"arch": "convblock", "norm": "bn", "width": 16, "depth": 2},
    "data": {"dataset": "synthetic", "batch_size": 32, "num_samples": 1024, "image_size": 16},
    "resources": {"device": "cpu"},
    "epochs": 4,
    "seed": 3,
    "checkpoint": {"every_epochs": 1, "keep_last": 2},
}
Key = tuple[str, int]


@pytest.fixture
def env(tmp_path: Path) -> ServiceEnv:
    """Embedded mode; spare attempts, since under load a lease can lapse while a child starts."""
    return make_env(
        tmp_path / "nc",
        NORMCORE_TRAIN_THREADS="1",
        NORMCORE_REAPER_INTERVAL_SECONDS="0.5",
        NORMCORE_MAX_ATTEMPTS="6",
    )


class SseFollower(threading.Thread):
    """Reads ``/jobs/{id}/events`` until the stream ends; drops the connection once when
    ``drop`` is set and reconnects with the last event id it got."""

    def __init__(self, stack: Stack, job_id: str, *, final: bool, drop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url = f"{stack.url}/jobs/{job_id}/events"
        self.headers = stack.headers
        self.params = {"final": "true"} if final else {}
        self.drop = drop
        self.rows: list[dict[str, Any]] = []
        self.reconnects = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            last_id: str | None = None
            while True:
                headers = dict(self.headers)
                if last_id is not None:
                    headers["Last-Event-ID"] = last_id
                    self.reconnects += 1
                ended, last_id = self._read(headers, last_id)
                if ended:
                    return
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _read(self, headers: dict[str, str], last_id: str | None) -> tuple[bool, str | None]:
        """One connection; returns (stream ended by the server, last event id)."""
        with httpx.stream(
            "GET", self.url, params=self.params, headers=headers, timeout=60
        ) as response:
            assert response.status_code == 200, response.read()
            event: dict[str, str] = {}
            for line in response.iter_lines():
                if line and not line.startswith(":"):
                    key, _, value = line.partition(":")
                    event[key] = value.removeprefix(" ")
                    continue
                if event.get("event") == "metric":
                    self.rows.append(json.loads(event["data"]))
                    last_id = event["id"]
                event = {}
                if self.drop.is_set() and self.reconnects == 0:
                    return False, last_id  # leave mid-stream, as a flaky network would
        return True, last_id


def _running_attempt(stack: Stack, job_id: str) -> tuple[int, int, int] | None:
    """(attempt, worker pid, training process pid) from the newest attempt's start line."""
    with stack.client() as c:
        items = c.get(f"/jobs/{job_id}/logs", params={"limit": 10_000}).json()["items"]
    found = None
    for item in items:
        m = re.search(r"attempt (\d+) started on worker \S+:(\d+) \(pid (\d+)\)", item["message"])
        if m:
            found = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    return found


def _freeze_past_a_checkpoint(store: Store, stack: Stack, job_id: str) -> tuple[int, int, int]:
    """SIGSTOP the training process's group once rows past the newest checkpoint are stored;
    returns (the largest seq then, the attempt's worker pid, its training process pid). Thawed
    and tried again if, stopped, there are none past it (a checkpoint landed in between)."""
    while True:
        wait_for(lambda: _past_checkpoint(store, job_id), timeout=120, interval=0.02, what="rows")
        started = _running_attempt(stack, job_id)
        assert started is not None
        _, worker, child = started
        os.killpg(child, signal.SIGSTOP)
        time.sleep(0.3)  # a write in flight commits or not; nothing starts after this
        past = _past_checkpoint(store, job_id)
        if past and _running_attempt(stack, job_id) == started:
            return past, worker, child
        os.killpg(child, signal.SIGCONT)


def _past_checkpoint(store: Store, job_id: str) -> int | None:
    """The largest seq if a train row past the job's newest checkpoint is stored, else None."""
    newest = max((c.step for c in store.list_checkpoints(job_id)), default=None)
    rows, _ = store.get_metrics(job_id, limit=10_000)
    if newest is None or not any(r.step > newest for r in rows):
        return None
    return max(r.seq for r in rows)


def _apply(rows: list[dict[str, Any]]) -> tuple[dict[Key, dict[str, Any]], int]:
    """Rows keyed by (split, step), later ones overwriting; checks each replacement names the
    row it supersedes. Returns the table and the number of replacements."""
    table: dict[Key, dict[str, Any]] = {}
    replaced = 0
    for row in rows:
        key = (row["split"], row["step"])
        if key in table:
            old = table[key]
            assert row["replaces"] == old["seq"], (key, row, old)
            assert row["attempt"] > old["attempt"] and row["seq"] > old["seq"]
            replaced += 1
        table[key] = row
    return table, replaced


def test_followers_get_each_row_once_or_as_a_recognisable_replacement(env: ServiceEnv) -> None:
    with running_stack(env, workers=1) as stack:
        client = Client(stack.url, token=stack.token)
        job_id = client.submit(SPEC)["id"]
        final_rows: list[dict[str, Any]] = []
        live_rows: list[dict[str, Any]] = []

        def follow(out: list[dict[str, Any]], final: bool) -> None:
            with Client(stack.url, token=stack.token) as own:
                out.extend(own.iter_metrics(job_id, poll=0.1, final=final))

        threads = [
            threading.Thread(target=follow, args=(final_rows, True), daemon=True),
            threading.Thread(target=follow, args=(live_rows, False), daemon=True),
        ]
        dropped = threading.Event()
        sse = [SseFollower(stack, job_id, final=f, drop=dropped) for f in (True, False)]
        for t in [*threads, *sse]:
            t.start()
        # The second worker starts while the first trains, so it is up when the job is re-queued.
        wait_for(lambda: client.get(job_id)["status"] == "running", timeout=120, what="a claim")
        stack.add_worker(name="worker-resume")

        store = env.store()
        past, worker, child = _freeze_past_a_checkpoint(store, stack, job_id)
        # Training is frozen with rows past its newest checkpoint stored: once the live
        # followers have read them all, the kill makes the resume rewrite rows they hold.
        wait_for(
            lambda: all(rows and rows[-1]["seq"] >= past for rows in (live_rows, sse[1].rows)),
            timeout=60,
            what="the live followers to read the rows past the checkpoint",
        )
        store.dispose()
        # The worker running the attempt (under load an earlier attempt may have been lost).
        (victim,) = [w for w in stack.workers if w.pid == os.getpgid(worker)]
        victim.kill_group(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child, signal.SIGKILL)
        victim.popen.wait(10)
        dropped.set()
        for t in [*threads, *sse]:
            t.join(timeout=180)
            assert not t.is_alive(), "a follower did not finish"

        job = client.get(job_id)
        assert job["status"] == "succeeded" and job["attempt"] >= 2, (job["error"], job["attempts"])
        history = client.metrics(job_id, limit=10_000)["items"]
        keys = [(r["split"], r["step"]) for r in history]
        assert len(keys) == len(set(keys))
        # every train step and one val row an epoch (the norm telemetry adds "gap" rows too)
        trained = [key for key in keys if key[0] in ("train", "val")]
        assert len(trained) == SPEC["epochs"] * (STEPS_PER_EPOCH + 1)
        assert any(r["attempt"] >= 2 and r["replaces"] is not None for r in history)

        # Final rows: each (split, step) once, and exactly the history, in seq order.
        assert sse[0].error is None and sse[0].reconnects == 1, sse[0].error
        for rows in (final_rows, sse[0].rows):
            assert rows == history

        # Live rows: replacements the follower can recognise; applied, they are the history.
        assert sse[1].error is None and sse[1].reconnects == 1
        for rows in (live_rows, sse[1].rows):
            table, replaced = _apply(rows)
            assert replaced >= 1
            assert sorted(table.values(), key=lambda r: r["seq"]) == history
        client.close()
