"""Warm training processes and the default thread count: real store, real fork server, real jobs.

Timing is never asserted here (benchmarks/latency.py measures it); what is asserted is that the
warm path is the one taken, and that what a spawned child guaranteed still holds for a forked one.
"""

from __future__ import annotations

import multiprocessing.forkserver
import os
import re
from pathlib import Path

import pytest

from service.settings import Settings
from service.store import Store
from tests.worker.test_runner import (
    Background,
    child_pid,
    log_text,
    new_job,
    pid_alive,
    spec,
    wait_for,
)
from worker.runner import run_job
from worker.threads import cgroup_cpu_limit, choose_train_threads


@pytest.fixture(autouse=True, scope="module")
def _fresh_fork_server() -> None:
    """Stop a fork server another test module of this process started (service.supervisor's):
    the preload list is read only when a server starts, and these tests check worker.warm's."""
    multiprocessing.forkserver._forkserver._stop()


WARM_LINE = re.compile(
    r"attempt 1 started on worker \S+ \(pid (\d+)\) [\d.]+ s after the claim, "
    r"forked from the warm fork server \(pid (\d+)\)"
)


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def warm_pids(store: Store, job_id: str) -> tuple[int, int]:
    """(the training child's pid, its fork server's pid) from the job's start line."""
    m = WARM_LINE.search(log_text(store, job_id))
    assert m, log_text(store, job_id)[:2000]
    return int(m.group(1)), int(m.group(2))


def test_jobs_are_forked_from_one_warm_fork_server(settings: Settings, store: Store) -> None:
    first = new_job(store, spec(epochs=1))
    assert run_job(first, settings, store) == "succeeded"
    second = new_job(store, spec(epochs=1))
    assert run_job(second, settings, store) == "succeeded"

    child1, server1 = warm_pids(store, first)
    child2, server2 = warm_pids(store, second)
    assert server1 == server2, "the second job did not reuse the warm fork server"
    assert child1 != child2, "one process per attempt"
    assert pid_alive(server1) and not pid_alive(child1) and not pid_alive(child2)
    cmdline = Path(f"/proc/{server1}/cmdline").read_bytes().replace(b"\0", b" ")
    assert b"forkserver" in cmdline
    # the fork server has torch imported: a job's child need not import it again
    assert "libtorch" in Path(f"/proc/{server1}/maps").read_text()
    # fork-safe: one thread (no OpenMP or other pool a fork would leave broken)
    assert len(list(Path(f"/proc/{server1}/task").iterdir())) == 1
    # the thread count was chosen, and the log says why
    text = log_text(store, second)
    assert re.search(r"torch threads \d+: chosen from \d+ CPUs? usable", text), text[:2000]


def test_a_warm_child_has_not_initialized_cuda_before_its_job(
    settings: Settings, store: Store
) -> None:
    job_id = new_job(store, spec())
    result = run_job(job_id, settings, store, train_target="tests.worker.fake_train:cuda_state")
    assert result == "succeeded"
    text = log_text(store, job_id)
    warm_pids(store, job_id)
    assert "cuda initialized before the job: False" in text


def test_memory_limit_applies_to_a_warm_child(settings: Settings, store: Store) -> None:
    limited = settings.model_copy(update={"train_memory_limit_bytes": 4 * 2**30})
    job_id = new_job(store, spec())
    target = "tests.worker.fake_train:allocate_16_gib"
    assert run_job(job_id, limited, store, train_target=target) == "failed"
    assert store.get_job(job_id).error.startswith("out of memory at step 1")
    text = log_text(store, job_id)
    assert "address space limited to 4.00 GiB" in text
    warm_pids(store, job_id)


def test_sigkill_of_a_warm_child_fails_the_job_and_leaves_the_server(
    settings: Settings, store: Store
) -> None:
    job_id = new_job(store, spec(epochs=500))
    bg = Background(job_id, settings, store)
    pid = child_pid(store, job_id)
    _, server = warm_pids(store, job_id)
    os.kill(pid, 9)
    assert bg.join() == "failed"
    assert store.get_job(job_id).error == "training process killed by signal 9 (SIGKILL)"
    assert pid_alive(server)


@pytest.mark.parametrize(
    ("requested", "concurrency", "api_beside", "cpus", "threads"),
    [
        (0, 1, True, 2, 1),  # the embedded service on a 2-core machine: one core each
        (0, 1, False, 2, 2),  # a worker alone: every core
        (0, 1, True, 1, 1),  # one core: nothing to keep back, never 0 threads
        (0, 4, False, 16, 4),
        (0, 3, True, 16, 5),  # (16 - 1) // 3
        (0, 8, False, 4, 1),  # more jobs than cores: one thread each
        (6, 4, True, 2, 6),  # train_threads wins, whatever the machine
    ],
)
def test_choose_train_threads(
    requested: int, concurrency: int, api_beside: bool, cpus: int, threads: int
) -> None:
    choice = choose_train_threads(
        requested, concurrency=concurrency, api_beside=api_beside, cpus=(cpus, "CPU affinity")
    )
    assert choice.threads == threads
    if requested:
        assert "NORMCORE_TRAIN_THREADS" in choice.reason
    else:
        assert f"{cpus} CPU" in choice.reason and "(CPU affinity)" in choice.reason
        assert ("kept for the API" in choice.reason) == (api_beside and cpus > 1)
        assert f"{concurrency} job" in choice.reason


def test_choose_train_threads_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        choose_train_threads(0, concurrency=0, api_beside=False, cpus=(2, "x"))
    with pytest.raises(ValueError):
        choose_train_threads(-1, concurrency=1, api_beside=False, cpus=(2, "x"))


def test_default_uses_this_process_affinity() -> None:
    choice = choose_train_threads(0, concurrency=1, api_beside=False)
    allowed = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_limit()
    assert choice.threads == min(allowed, quota or allowed)


def test_cgroup_cpu_limit_reads_v2_and_v1(tmp_path: Path) -> None:
    v2, quota, period = tmp_path / "cpu.max", tmp_path / "quota", tmp_path / "period"
    missing = tmp_path / "none"
    v2.write_text("150000 100000\n")
    assert cgroup_cpu_limit(v2, missing, missing) == 2  # 1.5 CPUs: 2 threads can run
    v2.write_text("max 100000\n")
    assert cgroup_cpu_limit(v2, missing, missing) is None
    quota.write_text("300000\n")
    period.write_text("100000\n")
    assert cgroup_cpu_limit(missing, quota, period) == 3
    quota.write_text("-1\n")
    assert cgroup_cpu_limit(missing, quota, period) is None
    v2.write_text("garbage")
    assert cgroup_cpu_limit(v2, missing, missing) is None


def test_a_dead_fork_server_leaves_the_job_for_the_reaper_and_is_restarted(
    settings: Settings, store: Store
) -> None:
    job_id = new_job(store, spec(epochs=500))
    bg = Background(job_id, settings, store)
    pid, server = warm_pids(store, child_pid(store, job_id) and job_id)
    os.kill(server, 9)  # the child's real exit status is lost with it
    assert bg.join() == "lost", store.get_job(job_id).error
    job = store.get_job(job_id)
    assert job.status == "running" and job.attempt == 1  # the lease runs out, the reaper re-queues
    assert "fork server died under this attempt" in log_text(store, job_id)
    wait_for(lambda: not running(pid), timeout=10, what="the child to be killed")

    again = new_job(store, spec(epochs=1))
    assert run_job(again, settings, store) == "succeeded"
    assert warm_pids(store, again)[1] != server  # a new fork server


def test_the_workers_fork_server_ignores_sigterm_and_the_worker_does_not() -> None:
    """A SIGTERM to the worker's process group (serve stopping) must leave the fork server, the
    parent of a child that is checkpointing, alive until the worker itself exits."""
    import subprocess
    import sys

    code = (
        "import multiprocessing.forkserver as fs, signal\n"
        "from worker import warm\n"
        "warm.start(wait=True)\n"
        "def ignored(pid):\n"
        "    mask = next(l for l in open(f'/proc/{pid}/status') if l.startswith('SigIgn:'))\n"
        "    return bool(int(mask.split()[1], 16) >> (signal.SIGTERM - 1) & 1)\n"
        "print(ignored(fs._forkserver._forkserver_pid), ignored('self'))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300
    )
    assert out.stdout.split() == ["True", "False"], out.stderr[-2000:]
