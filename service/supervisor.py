"""Keep the embedded deployment's processes up: restart a child that dies, with backoff.

``normcore serve`` runs the API (uvicorn) and one worker (``python -m worker``) as children of
one :class:`Supervisor`. A child that dies for any reason (kill -9, the kernel's OOM killer, a
crash) is started again after a delay, with a log line for the death and one for the restart;
the other child is left alone, so the API keeps answering while the worker is down and the
reverse. A worker's job is not restarted here: its lease expires (``lease_seconds``) and a reaper
(the API's, or the new worker's) re-queues it as its next attempt, which resumes from its last
checkpoint.

The API's listening socket belongs to the supervisor (``listen``) and is handed to each API
process, so the port stays bound while the API restarts: a request sent in that gap waits in the
kernel's accept queue and is answered by the next API process instead of being refused. A child
given as a Python ``target`` (the API) is forked from a ``multiprocessing`` fork server that has
imported ``preload`` once, so its restart skips seconds of imports (torch's).

Backoff (``Backoff``): a crash streak waits 1 s, 2 s, 4 s ... up to 30 s between restarts, so a
child that cannot start (a broken install, a port taken) does not spin; a child that stayed up
60 s before it died starts a new streak at 1 s. The same doubling-with-cap-and-reset shape as
systemd's ``RestartSec``/``RestartSteps`` and Erlang/OTP supervisors.

Stopping (``stop``): children stop one after the other in the order given (``serve``: the worker
before the API, so a running job gets ``stop_timeout`` seconds to checkpoint while the API still
answers), each with SIGTERM to its process group, then SIGKILL after its timeout.

The supervisor dying (kill -9, the OOM killer) takes its children with it: each one stops on
its own once its parent is gone (``normcore.procs.die_with_parent``: ``PR_SET_PDEATHSIG`` on
Linux, a ``getppid`` watch elsewhere), with the same SIGTERM-then-SIGKILL as ``stop``; a running
job is then recovered as after a worker crash. So the port is free again for the next ``serve``.

Why a small loop and not a library (checked 2026-11 on PyPI): supervisor 4.3 (supervisord) is a
daemon with its own config file and control socket, restarts a crashed program at once once it
has reached RUNNING and gives up (FATAL) after ``startretries`` failed starts instead of backing
off; circus 0.19 needs ZeroMQ and a daemon too; honcho 2.0 runs a Procfile and, by design, stops
everything when one process exits (what ``serve`` did before). Two children, a doubling delay and
an ordered stop are ~150 lines on ``subprocess`` with nothing to configure or install.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("normcore.supervisor")


@dataclass(frozen=True)
class Backoff:
    """Delay before restarting a child that died: doubling per crash in a row, capped, reset.

    ``initial`` and ``maximum`` are seconds; a child that ran at least ``reset_after`` seconds
    before it died counts as healthy, and its next crash is the first of a new streak.
    """

    initial: float = 1.0
    maximum: float = 30.0
    reset_after: float = 60.0

    def delay(self, streak: int) -> float:
        """Seconds to wait before the restart after crash number ``streak`` (1-based) of a streak:
        ``min(maximum, initial * 2 ** (streak - 1))``. Raises ValueError for ``streak < 1``."""
        if streak < 1:
            raise ValueError(f"streak counts crashes from 1, got {streak}")
        # The exponent is capped so a long streak cannot overflow the float.
        return min(self.maximum, self.initial * 2.0 ** min(streak - 1, 64))


@dataclass
class ChildSpec:
    """How to start one supervised process.

    ``argv`` is run with ``env`` (None: this process's environment) in a session of its own, so
    a terminal's Ctrl-C reaches it only through the supervisor; ``pass_fds`` stay open in it.
    ``target(*args)`` instead runs in a process forked from the supervisor's fork server (with
    the fork server's environment; ``args`` are pickled, sockets included); the target should
    call ``os.setsid()`` first. ``stop_timeout`` is the seconds between SIGTERM and SIGKILL.
    """

    name: str
    argv: list[str] | None = None
    env: dict[str, str] | None = None
    stop_timeout: float = 10.0
    pass_fds: tuple[int, ...] = ()  # inherited file descriptors (a listening socket)
    target: Callable[..., object] | None = None  # instead of argv: run in a forked process
    args: tuple[object, ...] = ()

    def __post_init__(self) -> None:
        if (self.argv is None) == (self.target is None):
            raise ValueError(f"child {self.name!r}: give exactly one of argv and target")


@dataclass
class Child:
    """The state of one supervised process."""

    spec: ChildSpec
    popen: subprocess.Popen[bytes] | Forked | None = None
    started_at: float = 0.0
    streak: int = 0  # crashes in a row, each within reset_after of its start
    restarts: int = 0
    restart_at: float | None = None  # when a dead child is due to start again
    pids: list[int] = field(default_factory=list)  # every pid it had, oldest first

    @property
    def pid(self) -> int | None:
        """The running process's pid, or None while it is down."""
        return self.popen.pid if self.popen is not None and self.popen.poll() is None else None

    def alive(self) -> bool:
        """True while the current process runs."""
        return self.pid is not None


def describe_exit(returncode: int) -> str:
    """'killed by SIGKILL (kill -9 or the OOM killer)' or 'exited with code 3', for log lines."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (kill -9 or the kernel's OOM killer)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with code {returncode}"


class Forked:
    """Popen's ``pid``/``poll``/``wait``/``returncode`` over a ``multiprocessing.Process``."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self.process = process

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.process.pid is not None  # started
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """Exit code, -N for signal N, None while it runs."""
        return self.process.exitcode

    def poll(self) -> int | None:
        """The exit code if the process ended, else None."""
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the end; subprocess.TimeoutExpired after ``timeout`` seconds."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(str(self.process.name), timeout or 0.0)
        return self.process.exitcode


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A TCP socket listening on ``host``:``port`` (IPv4 or IPv6, as ``host`` resolves), for a
    server child to inherit. Raises OSError when the address is taken."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _kill_group(pid: int, sig: int) -> None:
    """Signal ``pid``'s process group, or ``pid`` alone before it has made its group (a forked
    child between fork and ``setsid``)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


class Supervisor:
    """Start children, restart each one that dies after its backoff, stop them in order.

    Not thread-safe: one thread calls ``start``, ``check`` (every few hundred ms) and ``stop``.
    ``preload`` names modules the fork server imports once for the ``target`` children (it is
    process-wide: multiprocessing has one fork server per process). ``clock`` is injectable for
    tests; it must be monotonic seconds.
    """

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        *,
        backoff: Backoff | None = None,
        preload: Sequence[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique: {names}")
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.children = [Child(spec) for spec in specs]
        self._forkserver = multiprocessing.get_context("forkserver")
        if preload:
            self._forkserver.set_forkserver_preload(list(preload))

    def start_fork_server(self) -> None:
        """Start the fork server now, so its ``preload`` imports run while the caller does other
        start-up work (else the first ``start`` waits for them). Children forked later inherit
        the environment of this moment."""
        from multiprocessing import forkserver

        forkserver.ensure_running()

    def child(self, name: str) -> Child:
        """The child called ``name``; KeyError if there is none."""
        for child in self.children:
            if child.spec.name == name:
                return child
        raise KeyError(name)

    def start(self) -> None:
        """Start every child, in order."""
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        spec = child.spec
        if spec.target is not None:
            # daemon: if this process dies of an exception, multiprocessing's exit hook ends it
            process = self._forkserver.Process(
                target=spec.target, args=spec.args, name=spec.name, daemon=True
            )
            process.start()
            child.popen = Forked(process)
        else:
            assert spec.argv is not None
            child.popen = subprocess.Popen(
                spec.argv, env=spec.env, start_new_session=True, pass_fds=spec.pass_fds
            )
        child.started_at = self.clock()
        child.restart_at = None
        child.pids.append(child.popen.pid)

    def check(self) -> None:
        """One round: note children that died (and schedule their restart), start those due."""
        now = self.clock()
        for child in self.children:
            if child.popen is not None and child.restart_at is None:
                code = child.popen.poll()
                if code is not None:
                    self._died(child, code, now)
            if child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)
                child.restarts += 1
                log.warning(
                    "%s restarted (pid %d, restart %d)",
                    child.spec.name,
                    child.popen.pid,  # type: ignore[union-attr]
                    child.restarts,
                )

    def _died(self, child: Child, code: int, now: float) -> None:
        pid = child.popen.pid  # type: ignore[union-attr]
        # Whatever the child left in its process group (a server's helpers) goes with it.
        _kill_group(pid, signal.SIGKILL)
        uptime = now - child.started_at
        child.streak = 1 if uptime >= self.backoff.reset_after else child.streak + 1
        delay = self.backoff.delay(child.streak)
        child.restart_at = now + delay
        log.error(
            "%s (pid %d) %s after %.1f s up; restarting in %g s (crash %d in a row)",
            child.spec.name,
            pid,
            describe_exit(code),
            uptime,
            delay,
            child.streak,
        )

    def stop(self, order: Sequence[str] | None = None) -> dict[str, int | None]:
        """Stop the children one after the other; returns each one's exit code.

        ``order`` names the children in the order to stop them (the rest follow in reverse start
        order); by default the reverse of their start order. Each gets SIGTERM to its process
        group and up to ``stop_timeout`` seconds, then SIGKILL. A child waiting for its restart
        is not started again. Raises KeyError for an unknown name in ``order``.
        """
        first = [self.child(name) for name in order or ()]
        codes: dict[str, int | None] = {}
        for child in [*first, *(c for c in reversed(self.children) if c not in first)]:
            child.restart_at = None
            popen = child.popen
            if popen is None:
                codes[child.spec.name] = None
                continue
            if popen.poll() is None:
                log.info("stopping %s (pid %d)", child.spec.name, popen.pid)
                _kill_group(popen.pid, signal.SIGTERM)
                try:
                    popen.wait(child.spec.stop_timeout)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "%s did not stop within %g s; killing it",
                        child.spec.name,
                        child.spec.stop_timeout,
                    )
            _kill_group(popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(5)
            codes[child.spec.name] = popen.returncode
        return codes


def port_owner(port: int) -> int | None:
    """The pid of a process of this user listening on TCP ``port``, or None when none is found.

    Linux: the socket's inode from ``/proc/net/tcp`` and ``tcp6`` (state 0A = LISTEN), then the
    process holding it among ``/proc/*/fd`` (other users' processes cannot be read, so are not
    found). Elsewhere: ``lsof -t -iTCP:<port> -sTCP:LISTEN`` where lsof is installed.
    """
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)  # the header
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    if inodes:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                for fd in os.scandir(f"/proc/{entry.name}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(fd.path) in inodes:
                            return int(entry.name)
        return None
    if os.path.isdir("/proc/net"):
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        out = subprocess.run(
            ["lsof", "-t", f"-iTCP:{port}", "-sTCP:LISTEN"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.split()
        return int(out[0]) if out else None
    return None


def port_in_use_message(host: str, port: int) -> str:
    """What ``normcore serve`` says when ``host``:``port`` is taken: who holds it, if known."""
    pid = port_owner(port)
    who = f" by PID {pid}" if pid is not None else " by another process"
    return (
        f"port {port} is in use{who} (a previous normcore serve?); stop it "
        f"(kill {pid if pid is not None else '<PID>'}) or choose another port with --port"
    )
