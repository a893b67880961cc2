"""The README's curl session, run as written against a real embedded server and worker."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO, Stack

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("e2e-readme")]

START = "<!-- curl-session:start -->"
END = "<!-- curl-session:end -->"


def readme_session() -> str:
    """The bash block between the README's curl-session markers."""
    text = (REPO / "README.md").read_text()
    block = text.split(START, 1)[1].split(END, 1)[0]
    match = re.search(r"```bash\n(.*?)```", block, re.S)
    assert match, "the curl session block is missing from README.md"
    return match.group(1)


def test_readme_curl_session_runs_as_written(sqlite_stack: Stack, tmp_path: Path) -> None:
    """POST the example job, poll metrics with ?after, download and check the checkpoint."""
    for tool in ("curl", "jq", "sha256sum"):
        assert shutil.which(tool), f"the README's session needs {tool}"
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "NORMCORE_URL": sqlite_stack.url,
        "NORMCORE_TOKEN": sqlite_stack.token,
    }
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_session()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{sqlite_stack.api.log()[-3000:]}"
    out = run.stdout
    assert "status succeeded" in out, out

    # every epoch's validation row printed exactly once, in order
    spec = json.loads((REPO / "examples" / "lenet-digits.json").read_text())
    epochs = [json.loads(line)["epoch"] for line in out.splitlines() if line.startswith('{"epoch"')]
    assert [int(e) for e in epochs] == list(range(1, spec["epochs"] + 1)), out

    # the ETag the server sent is the sha256 of the bytes downloaded
    etag = re.search(r'(?im)^etag:\s*"?([0-9a-f]{64})"?', out)
    digest = re.search(r"(?m)^([0-9a-f]{64})\s+model\.safetensors$", out)
    assert etag and digest and etag.group(1) == digest.group(1), out

    # the stats line names a norm layer of the lenet
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["num_channels"] > 0 and stats["name"], out
