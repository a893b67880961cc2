"""The API starts without torch (issue 12: a warm ``serve.sh`` answers /healthz within 5 s):
building the app imports no torch, the API's fork server preloads none, and the spec modules
are imported on a thread once the app runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service import api_server
from tests.harness import REPO

CHECK = """
import sys
from service.api.app import SPEC_MODULES, create_app, import_spec_modules
from service.settings import Settings
app = create_app(Settings(data_dir=sys.argv[1]))
assert "torch" not in sys.modules, "building the app imported torch"
import_spec_modules()
assert "torch" in sys.modules and all(m in sys.modules for m in SPEC_MODULES)
print("ok")
"""


def test_the_app_is_built_without_torch(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECK, str(tmp_path / "nc")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_the_api_fork_server_preloads_no_torch() -> None:
    assert not any(
        m.startswith(("torch", "normcore.models", "normcore.factory")) for m in api_server.PRELOAD
    )
