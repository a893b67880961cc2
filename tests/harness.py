"""Start the real service for tests: uvicorn API and Celery worker subprocesses on loopback.

Each process gets its own session (process group) so a test can kill it, and its own log file in
the data dir so a failure shows what the server said.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServiceEnv:
    """The NORMCORE_* environment of one test deployment and where its files live."""

    data_dir: Path
    mode: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        return self.env["NORMCORE_DATABASE_URL"]

    @property
    def data_root(self) -> Path:
        return Path(self.env["NORMCORE_DATA_ROOT"])

    @property
    def artifact_dir(self) -> Path:
        return Path(self.env["NORMCORE_ARTIFACT_DIR"])

    def settings(self):  # -> service.settings.Settings
        """Settings for in-process use (Store, queue) pointing at this deployment."""
        from service.settings import Settings

        return Settings(
            data_dir=self.data_dir,
            database_url=self.env["NORMCORE_DATABASE_URL"],
            broker_url=self.env["NORMCORE_BROKER_URL"],
            artifact_dir=self.artifact_dir,
            data_root=self.data_root,
        )

    def store(self):  # -> service.store.Store
        """A Store on this deployment's database, migrated to head."""
        from service.store import Store

        store = Store(self.database_url)
        store.upgrade()
        return store


def make_env(
    data_dir: Path,
    *,
    mode: str = "sqlite",
    postgres_url: str | None = None,
    redis_url: str | None = None,
    **extra: str,
) -> ServiceEnv:
    """NORMCORE_* variables for an embedded (SQLite) or cluster (PostgreSQL + Redis) deployment.

    ``extra`` adds or overrides variables. Tests whose jobs only need to finish may pass
    ``NORMCORE_TRAIN_THREADS="1"``: under ``-n 2`` torch's default (a thread per core) in each
    training child oversubscribes the two cores. The default stays the worker's own choice, since
    some tests pace their assertions on it.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "NORMCORE_DATA_DIR": str(data_dir),
        "NORMCORE_ARTIFACT_DIR": str(data_dir / "artifacts"),
        "NORMCORE_DATA_ROOT": str(data_dir / "datasets"),
    }
    (data_dir / "datasets").mkdir(exist_ok=True)
    if mode == "sqlite":
        env["NORMCORE_DATABASE_URL"] = f"sqlite:///{data_dir / 'normcore.db'}"
        env["NORMCORE_BROKER_URL"] = f"sqla+sqlite:///{data_dir / 'broker.db'}"
    elif mode == "cluster":
        if not postgres_url or not redis_url:
            raise ValueError("cluster mode needs postgres_url and redis_url")
        env["NORMCORE_DATABASE_URL"] = postgres_url
        env["NORMCORE_BROKER_URL"] = redis_url
    else:
        raise ValueError(f"unknown mode {mode!r}")
    env.update({k.upper() if k.startswith("NORMCORE_") else k: v for k, v in extra.items()})
    return ServiceEnv(data_dir=data_dir, mode=mode, env=env)


class Proc:
    """A child process in its own session, with its output in a log file."""

    def __init__(self, args: list[str], env: ServiceEnv, name: str) -> None:
        self.name = name
        self.log_path = env.data_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, **env.env, "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(
            args,
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        """Everything the process printed so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal to the whole process group (the process and its children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the group, wait, then SIGKILL what is left."""
        if self.alive():
            self.kill_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self.kill_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._log.close()


def start_api(
    env: ServiceEnv, *, port: int | None = None, timeout: float = 60.0
) -> tuple[Proc, str]:
    """Start uvicorn with the app factory on a free loopback port; return it and its base URL."""
    port = port or free_port()
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        "service.api.app:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = Proc(args, env, f"api-{port}")
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc, timeout)
    return proc, url


def start_worker(
    env: ServiceEnv, *, queues: str = "cpu", name: str = "worker", extra: list[str] | None = None
) -> Proc:
    """Start `python -m worker` consuming the given queues."""
    args = [sys.executable, "-m", "worker", "--queues", queues, "--hostname", f"{name}@test"]
    return Proc([*args, *(extra or [])], env, name)


def wait_http(url: str, proc: Proc | None = None, timeout: float = 60.0) -> None:
    """Poll a URL until it answers 200; fail with the process log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    log = proc.log()[-4000:] if proc else ""
    raise TimeoutError(f"{url} not ready after {timeout}s\n{log}")


def wait_for(
    predicate,
    timeout: float = 60.0,
    interval: float = 0.2,
    what: str = "condition",
    explain=None,
):
    """Call predicate until it returns something truthy; return that value or raise TimeoutError.

    ``explain`` (optional, no arguments) returns text for the TimeoutError's message: what the
    deployment looked like when the wait gave up (see ``Stack.explain``).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    detail = ""
    if explain is not None:
        try:
            detail = "\n" + str(explain())
        except Exception as exc:  # the explanation must not hide the timeout
            detail = f"\n(no explanation: {exc!r})"
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}{detail}")


@dataclass
class Stack:
    """A running deployment: API URL, tokens, and the worker processes."""

    env: ServiceEnv
    api: Proc
    url: str
    token: str
    workers: list[Proc] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, token: str | None = None) -> httpx.Client:
        """An httpx client on the API with a bearer token (this stack's by default)."""
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token or self.token}"},
            timeout=30,
        )

    def token_for(self, user: str, *, admin: bool = False) -> str:
        """Create a token for a user (created if missing) straight in the store."""
        store = self.env.store()
        try:
            return store.create_token(user, f"{user}-{time.monotonic_ns()}", admin=admin)
        finally:
            store.dispose()

    def add_worker(self, queues: str = "cpu", name: str | None = None) -> Proc:
        """Start one more worker process."""
        proc = start_worker(self.env, queues=queues, name=name or f"worker{len(self.workers)}")
        self.workers.append(proc)
        return proc

    def explain(self, job_id: str | None = None) -> str:
        """The job's row (status, attempts, reason) as the store has it, and each worker's state
        and last log lines: what a test that timed out waiting on a job should print."""
        lines = []
        if job_id is not None:
            store = self.env.store()
            try:
                job = store.get_job(job_id)
                lines.append(
                    "job: missing"
                    if job is None
                    else f"job {job_id}: status={job.status} attempt={job.attempt} "
                    f"reason={job.status_reason!r} lease={job.lease_owner} "
                    f"until {job.lease_expires_at} attempts={job.attempts}"
                )
            finally:
                store.dispose()
        for proc in [self.api, *self.workers]:
            state = "alive" if proc.alive() else f"exited {proc.popen.returncode}"
            lines.append(f"--- {proc.name} (pid {proc.pid}, {state}):\n{proc.log()[-2500:]}")
        return "\n".join(lines)

    def stop(self) -> None:
        for proc in self.workers:
            proc.stop()
        self.api.stop()


@contextlib.contextmanager
def running_stack(env: ServiceEnv, *, workers: int = 1, queues: str = "cpu") -> Iterator[Stack]:
    """Migrate the store, create a user token, start the API and `workers` workers."""
    store = env.store()
    token = store.create_token("alice", "alice-test")
    store.dispose()
    api, url = start_api(env)
    stack = Stack(env=env, api=api, url=url, token=token)
    try:
        for _ in range(workers):
            stack.add_worker(queues=queues)
        yield stack
    finally:
        stack.stop()
