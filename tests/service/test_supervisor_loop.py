"""service.supervisor with real child processes (tiny Python scripts): restart with doubling
backoff and its reset, the other child untouched, ordered stop with SIGTERM then SIGKILL."""

from __future__ import annotations

import itertools
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from service.supervisor import (
    Backoff,
    ChildSpec,
    Supervisor,
    describe_exit,
    listen,
    port_in_use_message,
    port_owner,
)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def run_until(sup: Supervisor, done, timeout: float = 20.0) -> None:
    """Call ``sup.check()`` every 10 ms until ``done()`` or the timeout (then fail)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        sup.check()
        time.sleep(0.01)


def test_backoff_doubles_to_its_cap() -> None:
    b = Backoff(initial=1.0, maximum=30.0)
    assert [b.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert b.delay(10_000) == 30
    with pytest.raises(ValueError):
        b.delay(0)


def test_describe_exit() -> None:
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-9).startswith("killed by SIGKILL (kill -9 or the kernel's OOM killer)")
    assert describe_exit(-15) == "killed by SIGTERM"


def test_crash_loop_backs_off_and_spares_the_other_child(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="normcore.supervisor")
    sup = Supervisor(
        [
            ChildSpec("steady", py("import time; time.sleep(120)")),
            ChildSpec("crashy", py("import sys; sys.exit(3)")),
        ],
        backoff=Backoff(initial=0.1, maximum=0.4, reset_after=30.0),
    )
    sup.start()
    try:
        steady = sup.child("steady").pid
        crashy = sup.child("crashy")
        starts: list[float] = []
        seen = 0

        def four_restarts() -> bool:
            nonlocal seen
            if len(crashy.pids) > seen:
                seen = len(crashy.pids)
                starts.append(time.monotonic())
            return crashy.restarts >= 4

        run_until(sup, four_restarts)
        deaths = [m for m in caplog.messages if m.startswith("crashy (pid")]
        delays = [float(re.search(r"restarting in ([\d.]+) s", m).group(1)) for m in deaths]
        assert delays[:4] == [0.1, 0.2, 0.4, 0.4]
        assert all("exited with code 3" in m for m in deaths)
        assert all(f"(crash {n} in a row)" in deaths[n - 1] for n in (1, 2, 3, 4)), deaths
        assert sum("crashy restarted" in m for m in caplog.messages) == 4
        # The waits happened: each restart came at least its delay after the one before.
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(gap >= delay for gap, delay in zip(gaps, delays, strict=False)), gaps
        assert sup.child("steady").pid == steady and sup.child("steady").restarts == 0
    finally:
        sup.stop()


def test_a_child_that_stayed_up_starts_a_new_streak(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="normcore.supervisor")
    sup = Supervisor(
        [ChildSpec("slow", py("import time, sys; time.sleep(0.4); sys.exit(1)"))],
        backoff=Backoff(initial=0.05, maximum=10.0, reset_after=0.3),
    )
    sup.start()
    try:
        run_until(sup, lambda: sup.child("slow").restarts >= 3)
    finally:
        sup.stop()
    deaths = [m for m in caplog.messages if m.startswith("slow (pid")]
    assert len(deaths) >= 3
    assert all("restarting in 0.05 s (crash 1 in a row)" in m for m in deaths), deaths


def test_stop_goes_in_the_order_given_and_kills_a_child_that_hangs(tmp_path: Path) -> None:
    events = tmp_path / "events"
    # Each child appends "<name> term" on SIGTERM, takes 0.3 s (a checkpoint), appends
    # "<name> exit" and exits 0; "stubborn" ignores SIGTERM.
    graceful = (
        "import signal, sys, time, pathlib\n"
        "name, events = sys.argv[1], pathlib.Path(sys.argv[2])\n"
        "def note(what):\n"
        "    with events.open('a') as f: f.write(f'{name} {what}\\n')\n"
        "def on_term(*_):\n"
        "    note('term'); time.sleep(0.3); note('exit'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "note('ready')\n"
        "while True: time.sleep(1)\n"
    )
    stubborn = (
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "pathlib.Path(sys.argv[2]).open('a').write('stubborn ready\\n')\n"
        "while True: time.sleep(1)\n"
    )
    sup = Supervisor(
        [
            ChildSpec("worker", [*py(graceful), "worker", str(events)]),
            ChildSpec("api", [*py(graceful), "api", str(events)]),
            ChildSpec("stubborn", [*py(stubborn), "stubborn", str(events)], stop_timeout=0.5),
        ]
    )
    sup.start()

    def all_ready() -> bool:
        return events.exists() and events.read_text().count("ready") == 3

    run_until(sup, all_ready)
    codes = sup.stop(order=["worker"])  # then the rest in reverse start order
    lines = [line for line in events.read_text().splitlines() if "ready" not in line]
    # The worker stops (and finishes its checkpoint) before anything else is told to stop.
    assert lines == ["worker term", "worker exit", "api term", "api exit"]
    assert list(codes.items()) == [("worker", 0), ("stubborn", -9), ("api", 0)]
    assert all(not child.alive() for child in sup.children)


def test_listen_holds_the_port_for_a_child_and_refuses_a_taken_one() -> None:
    sock = listen("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert sock.get_inheritable()
        with pytest.raises(OSError):
            listen("127.0.0.1", port)
    finally:
        sock.close()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="Linux's /proc; lsof elsewhere")
def test_a_taken_port_names_the_process_holding_it() -> None:
    sock = listen("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert port_owner(port) == os.getpid()
        message = port_in_use_message("127.0.0.1", port)
        assert f"port {port} is in use by PID {os.getpid()} (a previous normcore serve?)" in message
    finally:
        sock.close()
    assert port_owner(port) is None


def test_forked_children_restart_and_stop(caplog: pytest.LogCaptureFixture) -> None:
    """Children given as a Python target (forked from the fork server, as the API is)."""
    caplog.set_level(logging.INFO, logger="normcore.supervisor")
    sup = Supervisor(
        [
            ChildSpec("sleeper", target=time.sleep, args=(60,)),
            ChildSpec("exits", target=os._exit, args=(3,)),
        ],
        backoff=Backoff(initial=0.05, maximum=0.1, reset_after=30.0),
    )
    sup.start()
    try:
        run_until(sup, lambda: sup.child("exits").restarts >= 2)
        sleeper = sup.child("sleeper").pid
        assert sleeper is not None and sup.child("sleeper").restarts == 0
    finally:
        codes = sup.stop()
    deaths = [m for m in caplog.messages if m.startswith("exits (pid")]
    assert len(deaths) >= 2 and all("exited with code 3" in m for m in deaths)
    # SIGTERM reaches a forked child that made no process group of its own, too.
    assert codes["sleeper"] == -signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(sleeper, 0)


def test_a_child_needs_argv_or_target() -> None:
    with pytest.raises(ValueError):
        ChildSpec("none")
    with pytest.raises(ValueError):
        ChildSpec("both", argv=["true"], target=print)
