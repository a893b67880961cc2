"""``normcore serve`` keeps its deployment up: kill -9 of the worker, three times in one job, and
of the API, against one real ``serve`` process (uvicorn, Celery worker, training children).

Worker: a probe asks ``/healthz`` every 0.2 s throughout and every probe is answered; each killed
worker is restarted by the supervisor, the job's lease expires and a reaper re-queues it, and the
job ends ``succeeded`` as attempt 4 with one metric row per (split, step). API: back within 10 s
(a request sent during the gap waits on the socket the supervisor holds and is answered), with
every job and row still there and the running job still in its first attempt. Then: every file
``serve`` and its children wrote under the data folder is 0600 and every folder 0700, and the
admin token appears in no log. A second ``serve`` on the taken port says which PID holds it and
exits 1; kill -9 of the ``serve`` process alone ends its API, worker and training process within
seconds and frees the port, and a new ``serve`` on the same data folder resumes the job. Finally
SIGTERM stops the worker, then the API, and exits 0.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import REPO, free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("e2e-supervisor")]

FINISHED = ("succeeded", "failed", "cancelled")
SERVE = [sys.executable, "-m", "service.cli", "serve"]
# ~64 steps an epoch of a few ms each at one thread: the job outlives three kill rounds, each of
# which kills soon after the attempt starts training.
SPEC: dict[str, Any] = {
    "name": "supervised",
    "model": {"arch": "convblock", "norm": "gn:4", "width": 8, "depth": 1, "num_classes": 4},
    "data": {"dataset": "synthetic", "batch_size": 32, "num_samples": 2048, "image_size": 8},
    "optim": {"name": "sgd", "lr": 0.05},
    "resources": {"device": "cpu"},
    # Enough epochs to outlive three kills on a quiet machine, where an epoch takes ~0.1 s and
    # each attempt trains a few epochs between "training started" and the test's kill.
    "epochs": 36,
    "checkpoint": {"every_epochs": 1, "keep_last": 2},
}


@dataclass
class Served:
    """A running ``normcore serve`` and where its output goes."""

    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log_path: Path

    @property
    def token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self, name: str) -> list[int]:
        """Every pid the supervisor reported for child ``name``, oldest first."""
        return [int(p) for p in re.findall(rf"\b{name} (?:restarted \()?pid (\d+)", self.log())]

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )


def start_serve(data_dir: Path, log_path: Path, port: int) -> Served:
    """Start ``normcore serve`` on ``port`` (its output appended to ``log_path``) and wait until
    it says it is up; raises (after killing it) when it does not come up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMCORE_")}
    # Three lost attempts and the one that succeeds, plus slack for a lease lost to load.
    env.update(PYTHONUNBUFFERED="1", NORMCORE_TRAIN_THREADS="1", NORMCORE_MAX_ATTEMPTS="6")
    argv = [*SERVE, "--port", str(port)]
    start = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [*argv, "--data-dir", str(data_dir)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    served = Served(proc, f"http://127.0.0.1:{port}", data_dir, log_path)

    def up() -> bool:
        assert proc.poll() is None, served.log()[-4000:]
        return "Ctrl-C" in served.log()[start:]

    try:
        wait_for(up, timeout=120, what="normcore serve to come up")
    except BaseException:
        stop_serve(served)
        raise
    return served


def stop_serve(served: Served) -> None:
    """SIGTERM, then SIGKILL of whatever ``served`` and its children left."""
    proc = served.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in served.pids("api") + served.pids("worker"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("supervised")
    # The log beside the data folder, as `serve.sh > serve.log` would be.
    served = start_serve(root / "data", root / "serve.log", free_port())
    try:
        yield served
    finally:
        stop_serve(served)


class Prober(threading.Thread):
    """GET /healthz every ``interval`` seconds; counts the answers and keeps every failure."""

    def __init__(self, url: str, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.answered = 0
        self.failures: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._halt.is_set():
                started = time.monotonic()
                try:
                    r = client.get(f"{self.url}/healthz")
                    if r.status_code == 200:
                        self.answered += 1
                    else:
                        self.failures.append(f"HTTP {r.status_code}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self._halt.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def __enter__(self) -> Prober:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join(15)


def submit(c: httpx.Client, body: dict[str, Any]) -> str:
    r = c.post("/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def job(c: httpx.Client, job_id: str) -> dict[str, Any]:
    r = c.get(f"/jobs/{job_id}")
    r.raise_for_status()
    return r.json()


def log_text(c: httpx.Client, job_id: str) -> str:
    items = c.get(f"/jobs/{job_id}/logs", params={"limit": 10_000}).json()["items"]
    return "\n".join(item["message"] for item in items)


def rows(c: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return c.get(f"/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["items"]


def wait_finished(c: httpx.Client, job_id: str, timeout: float = 240) -> dict[str, Any]:
    return wait_for(
        lambda: (j := job(c, job_id))["status"] in FINISHED and j,
        timeout=timeout,
        interval=0.25,
        what=f"job {job_id} to end",
    )


def assert_complete(items: list[dict[str, Any]], epochs: int) -> None:
    """One row per (split, step): every train step and one val row per epoch."""
    keys = [(r["split"], r["step"]) for r in items]
    assert len(keys) == len(set(keys)), "a (split, step) metric row appears twice"
    val = sorted((r for r in items if r["split"] == "val"), key=lambda r: r["step"])
    assert [r["epoch"] for r in val] == list(range(1, epochs + 1))
    train = sorted(step for split, step in keys if split == "train")
    assert train == list(range(1, val[-1]["step"] + 1))


def test_worker_killed_three_times_during_a_job(served: Served) -> None:
    killed: list[int] = []
    recoveries: list[float] = []  # seconds from a kill to the next attempt running
    with Prober(served.url) as probe, served.client() as c:
        job_id = submit(c, SPEC)
        for attempt in (1, 2, 3):

            def training(attempt: int = attempt) -> int:
                """The pid of the worker running ``attempt`` once it trains, else 0."""
                j = job(c, job_id)
                assert j["status"] in ("queued", "running"), (j, served.log()[-3000:])
                if j["attempt"] != attempt or j["status"] != "running":
                    return 0
                text = log_text(c, job_id)
                m = re.search(rf"attempt {attempt} started on worker \S+:(\d+) ", text)
                started = f"training started (attempt {attempt})" in text
                return int(m.group(1)) if m and started else 0

            worker_pid = wait_for(training, timeout=120, what=f"attempt {attempt} training")
            if attempt == 1:  # a checkpoint first, so the next attempts resume from it
                wait_for(lambda: c.get(f"/jobs/{job_id}/checkpoints").json(), timeout=60)
            os.kill(worker_pid, signal.SIGKILL)
            killed.append(worker_pid)
            killed_at = time.monotonic()
            wait_for(
                lambda pid=worker_pid: f"worker (pid {pid}) killed by SIGKILL" in served.log(),
                timeout=10,
                what="the supervisor to notice the kill",
            )
            wait_for(
                lambda n=attempt + 1: (
                    (j := job(c, job_id))["attempt"] == n and j["status"] == "running"
                ),
                timeout=120,
                interval=0.1,
                what=f"attempt {attempt + 1} running",
            )
            recoveries.append(time.monotonic() - killed_at)
        done = wait_finished(c, job_id)
        items = rows(c, job_id)
        text = log_text(c, job_id)

    print(f"recoveries {[round(r, 1) for r in recoveries]} s; {probe.answered} probes answered")
    assert probe.failures == [], probe.failures
    # Lease (6 s) + a reaper round (1 s) + a broker poll + the worker's restart (backoff 1, 2,
    # 4 s and its start): generous for a loaded 2-core CI machine.
    assert max(recoveries) < 60, recoveries
    assert probe.answered >= 25  # 0.2 s apart over the whole run, which takes 30 s or more
    assert done["status"] == "succeeded", (done, served.log()[-3000:])
    assert done["attempt"] >= 4
    outcomes = [a["outcome"] for a in done["attempts"]]
    assert outcomes.count("lost") >= 3 and outcomes[-1] == "succeeded", outcomes
    assert re.search(r"resuming attempt \d+ from checkpoint epoch-\d+", text), text[-3000:]
    assert_complete(items, SPEC["epochs"])
    # Each kill has its log line and a restart; the API never died.
    log = served.log()
    assert log.count("worker restarted (pid") >= 3
    assert len(served.pids("api")) == 1
    assert set(killed) <= set(served.pids("worker")[:-1])


def test_api_killed_comes_back_and_loses_nothing(served: Served) -> None:
    with served.client() as c:
        before = {
            j["id"]: j["status"] for j in c.get("/jobs", params={"limit": 200}).json()["items"]
        }
        job_id = submit(c, {**SPEC, "name": "through-an-api-kill", "epochs": 15})
        wait_for(lambda: len(rows(c, job_id)) >= 30, timeout=120, what="the job to train")
        rows_before = rows(c, job_id)

    api_pid = served.pids("api")[-1]
    os.kill(api_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # Sent at once: it waits on the listening socket the supervisor holds, not refused.
    r = httpx.get(f"{served.url}/healthz", timeout=30)
    back = time.monotonic() - killed_at
    print(f"the API answered {back:.1f} s after its kill -9")
    assert r.status_code == 200
    assert back < 10, f"the API answered {back:.1f} s after the kill"
    log = served.log()
    assert f"api (pid {api_pid}) killed by SIGKILL" in log
    assert served.pids("api")[-1] != api_pid

    with served.client() as c:
        after = {
            j["id"]: j["status"] for j in c.get("/jobs", params={"limit": 200}).json()["items"]
        }
        assert set(before) | {job_id} <= set(after)
        assert all(after[i] == s for i, s in before.items() if s in FINISHED)
        still = {r["seq"]: r for r in rows(c, job_id)}
        assert all(still.get(r["seq"]) == r for r in rows_before), "a row written before is gone"
        done = wait_finished(c, job_id)
        # The worker trained on through the API's restart: same attempt, nothing re-run.
        assert done["status"] == "succeeded" and done["attempt"] == 1, done
        assert_complete(rows(c, job_id), 15)


def test_files_are_private_and_the_token_is_never_logged(served: Served) -> None:
    token = served.token
    with served.client() as c:
        ids = [j["id"] for j in c.get("/jobs", params={"limit": 200}).json()["items"]]
        if not any(job(c, i)["status"] == "succeeded" for i in ids):  # this test run alone
            small = {**SPEC, "epochs": 1, "data": {**SPEC["data"], "num_samples": 256}}
            ids.append(submit(c, small))
            assert wait_finished(c, ids[-1])["status"] == "succeeded"
        assert all(token not in log_text(c, i) for i in ids)
    assert token not in served.log()

    assert served.data_dir.stat().st_mode & 0o777 == 0o700
    paths = list(served.data_dir.rglob("*"))
    assert any(p.name == "model.safetensors" for p in paths)  # written by a training child
    loose = [
        f"{p.relative_to(served.data_dir)} {p.stat().st_mode & 0o777:o}"
        for p in paths
        if p.stat().st_mode & 0o777 != (0o700 if p.is_dir() else 0o600)
    ]
    assert loose == [], loose
    # Only the token file holds the token (the database keeps its sha256).
    holders = [p.name for p in paths if p.is_file() and token.encode() in p.read_bytes()]
    assert holders == ["admin.token"]


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/``pid``/stat after the command name (state, ppid ...); None when
    there is no such process (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _parents() -> dict[int, int]:
    """The parent of every live (not zombie) process."""
    out: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[0] != "Z":
            out[int(entry.name)] = int(fields[1])
    return out


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``: children, grandchildren ..."""
    parent = _parents()
    found: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parent.items() if pp == p} - found
        found |= kids
        todo.extend(kids)
    return found


def children(pid: int) -> set[int]:
    """The live processes whose parent is ``pid``."""
    return {c for c, pp in _parents().items() if pp == pid}


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def port_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:``port``."""
    from service.supervisor import listen

    try:
        listen("127.0.0.1", port).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree in /proc")
def test_kill_9_of_serve_alone_leaves_no_orphan_and_the_job_resumes(served: Served) -> None:
    """Before the SIGTERM test, which then stops the serve started here in place of ``served``."""
    port = int(served.url.rsplit(":", 1)[1])
    # The port taken (by this serve): a clear message naming a holder, exit 1, no traceback.
    taken = subprocess.run(
        [*SERVE, "--port", str(port), "--data-dir", str(served.data_dir.parent / "other")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = taken.stdout + taken.stderr
    assert taken.returncode == 1, said
    m = re.search(rf"port {port} is in use by PID (\d+) \(a previous normcore serve\?\)", said)
    assert m, said
    assert "Traceback" not in said
    first = served.proc
    assert int(m.group(1)) in {first.pid} | descendants(first.pid)

    with served.client() as c:
        # long enough to be mid-training at the kill on a quiet machine (6 epochs finished first)
        job_id = submit(c, {**SPEC, "name": "through-a-serve-kill", "epochs": 30})
        wait_for(lambda: c.get(f"/jobs/{job_id}/checkpoints").json(), timeout=120)
        assert job(c, job_id)["status"] == "running"
        m = re.search(r"attempt 1 started on worker \S+:(\d+) ", log_text(c, job_id))
        assert m
    tree = descendants(first.pid)
    worker_pid = int(m.group(1))
    # the training process: below the worker's warm fork server
    assert descendants(worker_pid) - children(worker_pid), "no training process"
    assert {served.pids("api")[-1], worker_pid} <= tree
    os.kill(first.pid, signal.SIGKILL)  # the supervisor alone
    first.wait(10)
    killed_at = time.monotonic()
    wait_for(
        lambda: not any(alive(p) for p in tree) and port_free(port),
        timeout=40,
        interval=0.1,
        what="the old API, worker and training processes to end and the port to be free",
        explain=lambda: f"alive: {[p for p in tree if alive(p)]}\n{served.log()[-3000:]}",
    )
    gone = time.monotonic() - killed_at
    print(f"every process of the killed serve gone {gone:.1f} s after its kill -9")

    # The same data folder and port; the module fixture stops this one.
    served.proc = start_serve(served.data_dir, served.log_path, port).proc
    with served.client() as c:
        done = wait_finished(c, job_id)
        text = log_text(c, job_id)
    assert done["status"] == "succeeded" and done["attempt"] >= 2, done
    assert re.search(r"resuming attempt \d+ from checkpoint epoch-\d+", text), text[-3000:]


def test_sigterm_stops_the_worker_then_the_api_and_exits_0(served: Served) -> None:
    children = [served.pids("api")[-1], served.pids("worker")[-1]]
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(60) == 0
    log = served.log()
    assert log.index("stopping worker (pid") < log.index("stopping api (pid")
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
