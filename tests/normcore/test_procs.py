"""normcore.procs on real processes: exit codes, group signals, the orphan watch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from normcore.procs import ExitCode, signal_group, signal_name

REPO = Path(__file__).resolve().parents[2]


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an orphan's reaper may be slow or absent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_exit_codes_and_signal_names() -> None:
    assert [int(c) for c in ExitCode] == [0, 1, 3, 4]
    assert signal_name(9) == "SIGKILL" and signal_name(15) == "SIGTERM"
    assert signal_name(99) == "signal 99"


def test_signal_group_kills_a_group_or_a_process_without_one() -> None:
    leader = subprocess.Popen(
        [sys.executable, "-c", "import subprocess; subprocess.run(['sleep', '30'])"],
        start_new_session=True,
    )
    time.sleep(0.5)
    signal_group(leader.pid, signal.SIGKILL)
    assert leader.wait(10) == -signal.SIGKILL
    # a process still in our group (no group of its own yet): it alone gets the signal
    plain = subprocess.Popen(["sleep", "30"])
    signal_group(plain.pid, signal.SIGTERM)
    assert plain.wait(10) == -signal.SIGTERM
    signal_group(plain.pid, signal.SIGKILL)  # gone: ignored


def test_watch_parent_ends_an_orphan(tmp_path: Path) -> None:
    err = tmp_path / "err.txt"
    orphan = (
        "import os, time\n"
        "from normcore.procs import watch_parent\n"
        "watch_parent(os.getppid(), 'the test orphan', interval=0.1)\n"
        "print(os.getpid(), flush=True)\n"
        "time.sleep(60)\n"
    )
    # the middle process starts the orphan-to-be and exits at once: the orphan is reparented
    middle = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {orphan!r}], stdout=subprocess.PIPE,"
        f" stderr=open({str(err)!r}, 'w'))\n"
        "print(p.stdout.readline().decode().strip(), flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", middle], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not running(pid):
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the orphan kept running after its parent exited")
    assert "the supervisor of the test orphan is gone" in err.read_text()


def test_die_with_parent_sends_sigterm_then_kills_after_the_grace(tmp_path: Path) -> None:
    err = tmp_path / "err.txt"
    # The orphan-to-be ignores SIGTERM (notes it instead), so only the grace's kill ends it.
    orphan = (
        "import os, signal, sys, time\n"
        "from normcore.procs import die_with_parent\n"
        "signal.signal(signal.SIGTERM, lambda *a: print('got SIGTERM', file=sys.stderr,"
        " flush=True))\n"
        "die_with_parent(os.getppid(), 'the test orphan', grace=0.5, interval=0.1)\n"
        "print(os.getpid(), flush=True)\n"
        "time.sleep(60)\n"
    )
    middle = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', {orphan!r}], stdout=subprocess.PIPE,"
        f" stderr=open({str(err)!r}, 'w'))\n"
        "print(p.stdout.readline().decode().strip(), flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", middle], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 20
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if running(pid):
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the orphan kept running after its parent exited")
    text = err.read_text()
    assert "got SIGTERM" in text  # the stop its supervisor would have asked for first
    assert "the test orphan did not stop within 0.5 s; killing it" in text
