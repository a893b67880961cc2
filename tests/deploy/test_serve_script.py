"""scripts/serve.sh installs only when it must: run for real against a stand-in .venv whose
python, pip and normcore record their calls (no package is installed, nothing is served)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# python: `-m venv` makes nothing (the stand-in venv exists); `-c CODE` (the import and
# find_spec checks) succeeds only while the file "ready" exists.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$CALLS"
[ "$1" = -c ] && { [ -e "$ROOT/ready" ]; exit; }
exit 0
"""
FAKE_PIP = '#!/usr/bin/env bash\necho "pip $*" >> "$CALLS"\n'
FAKE_NORMCORE = '#!/usr/bin/env bash\necho "normcore $*" >> "$CALLS"\n'


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of serve.sh and pyproject.toml beside a stand-in .venv, everything "installed"."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "serve.sh", tmp_path / "scripts" / "serve.sh")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    executable(bin_dir / "python", FAKE_PYTHON)
    executable(bin_dir / "pip", FAKE_PIP)
    executable(bin_dir / "normcore", FAKE_NORMCORE)
    (tmp_path / "ready").touch()
    return tmp_path


def serve(project: Path, *args: str, **env: str) -> list[str]:
    """Run serve.sh; the calls the stand-ins recorded, one string each."""
    calls = project / "calls.log"
    calls.unlink(missing_ok=True)
    full_env = {**os.environ, "CALLS": str(calls), "ROOT": str(project), **env}
    full_env.pop("NORMCORE_SERVE_INSTALL", None)
    full_env.update(env)
    subprocess.run(
        ["bash", str(project / "scripts" / "serve.sh"), *args], env=full_env, check=True, timeout=60
    )
    return calls.read_text().splitlines()


def script_needs(project: Path) -> set[str]:
    """The module names serve.sh checks with find_spec before starting (its NEEDED list)."""
    text = (project / "scripts" / "serve.sh").read_text()
    block = text.split('NEEDED="', 1)[1].split('"', 1)[0]
    return set(block.replace("\\\n", " ").split())


def installs(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("pip ")]


def test_installs_once_then_starts_without_installing(project: Path) -> None:
    first = serve(project, "--port", "0")
    assert installs(first) == ["pip install --quiet -e .[service,data,client,onnx]"]
    assert first[-1] == "normcore serve --port 0"
    assert (project / ".venv" / ".normcore-serve.sha256").is_file()

    again = serve(project, "--port", "0")
    assert installs(again) == []
    assert again[-1] == "normcore serve --port 0"
    # the readiness check looks packages up without importing them (no torch import)
    assert not any("import torch" in c for c in again)


def test_installs_when_pyproject_changes_or_a_package_is_missing(project: Path) -> None:
    serve(project)
    with (project / "pyproject.toml").open("a") as f:
        f.write("\n# a new dependency\n")
    assert installs(serve(project)) == ["pip install --quiet -e .[service,data,client,onnx]"]
    assert installs(serve(project)) == []

    (project / "ready").unlink()  # a package went missing (and with it torch)
    calls = serve(project)
    assert installs(calls) == [
        "pip install --quiet torch==2.13.0",
        "pip install --quiet -e .[service,data,client,onnx]",
    ]
    assert not any("test" in c for c in installs(calls)), "no test extras for serving"
    # the embedded worker builds ONNX exports: a missing onnx package triggers the install
    assert all(m in script_needs(project) for m in ("onnx", "onnxscript", "onnxruntime"))
    (project / "ready").touch()
    assert installs(serve(project, NORMCORE_SERVE_INSTALL="1")) != []
