"""`pip install normcore` is the library: it imports, trains and checkpoints without the extras.

The shared environment has every extra installed, so the tests run a fresh interpreter whose
import system cannot find the extras' packages (every meta-path finder is wrapped to miss them,
as for a missing package) and, for the library, normcore's own service and worker packages.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# top-level modules of the packages each extra brings (and what they pull in)
SERVICE_MODULES = (
    "fastapi",
    "starlette",
    "uvicorn",
    "sse_starlette",
    "pydantic_settings",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "celery",
    "kombu",
    "redis",
    "prometheus_client",
)
EXTRA_MODULES = (*SERVICE_MODULES, "httpx", "httpcore", "sklearn", "PIL", "onnx", "onnxruntime")
# what normcore's modules may import when they are imported: the library's own dependencies
CORE_MODULES = {"torch", "numpy", "pydantic", "safetensors", "yaml", "typer", "rich", "normcore"}

# Hides the blocked packages from every finder on sys.meta_path, so that they look uninstalled:
# `import x` raises ModuleNotFoundError and importlib.util.find_spec("x") returns None (torch
# probes optional packages that way).
BLOCKER = """
import sys
BLOCKED = set({blocked!r})
class _Hide:
    def __init__(self, finder):
        self._finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return self._finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self._finder, attr)
sys.meta_path[:] = [_Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
for _name in list(sys.modules):
    if _name.partition(".")[0] in BLOCKED:
        del sys.modules[_name]
"""


def _run(code: str, blocked: tuple[str, ...], cwd: Path) -> subprocess.CompletedProcess[str]:
    script = BLOCKER.format(blocked=sorted(blocked)) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )


TINY_SPEC = {
    "name": "tiny",
    "model": {"arch": "convblock", "norm": "bn", "num_classes": 3, "width": 4, "depth": 1},
    "data": {
        "dataset": "synthetic",
        "num_samples": 48,
        "image_size": 8,
        "channels": 3,
        "num_classes": 3,
        "batch_size": 16,
    },
    "epochs": 1,
    "resources": {"device": "cpu"},
}


def test_library_trains_without_any_extra(tmp_path: Path) -> None:
    """Import every normcore module, train, load the checkpoint; the extras say their names."""
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(TINY_SPEC))
    code = f"""
    import importlib, importlib.util, pkgutil, sys
    assert importlib.util.find_spec("fastapi") is None  # the blocker works
    try:
        import sqlalchemy
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError("sqlalchemy imported")
    import torch
    import normcore
    for info in pkgutil.walk_packages(normcore.__path__, "normcore."):
        importlib.import_module(info.name)

    result = normcore.train({str(spec)!r}, workdir={str(tmp_path / "run")!r})
    assert result.status == "succeeded", result.status
    model = normcore.load_model(result.checkpoints[-1].path)
    assert not model.training
    with torch.no_grad():
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)

    messages = {{}}
    for name, call in [
        ("onnx", lambda: normcore.export_onnx(model, torch.randn(2, 3, 8, 8), "m.onnx")),
        ("data", lambda: importlib.import_module("normcore.data.digits").load_digits()),
        ("client", lambda: __import__("normcore.client").client.Client("http://127.0.0.1:9")),
    ]:
        try:
            call()
        except ImportError as exc:
            messages[name] = str(exc)
    service = [m for m in sys.modules if m.partition(".")[0] in ("service", "worker")]
    print("RESULT", repr((messages, service)))
    """
    blocked = (*EXTRA_MODULES, "service", "worker")
    proc = _run(code, blocked, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    messages, service = ast.literal_eval(line.removeprefix("RESULT "))
    assert service == []
    assert set(messages) == {"onnx", "data", "client"}, messages
    for extra, message in messages.items():
        assert f"pip install 'normcore[{extra}]'" in message, message


def test_cli_train_without_service_extras_and_a_clear_message_for_serve(tmp_path: Path) -> None:
    """The console script's train runs on the library alone; digits and serve name their extra."""
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(TINY_SPEC))
    template = """
    import sys
    from service.cli import main
    sys.argv = ["normcore", *{argv!r}]
    main()
    """
    train = _run(
        template.format(argv=["train", str(spec), "--workdir", str(tmp_path / "run")]),
        EXTRA_MODULES,
        tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "succeeded" in train.stdout
    assert list((tmp_path / "run" / "checkpoints").iterdir())

    digits = _run(
        template.format(argv=["train", str(ROOT / "examples" / "lenet-digits.json")]),
        EXTRA_MODULES,
        tmp_path,
    )
    assert digits.returncode == 2, digits.stdout + digits.stderr
    assert "pip install 'normcore[data]'" in digits.stderr
    assert "Traceback" not in digits.stderr

    serve = _run(
        template.format(argv=["serve", "--data-dir", str(tmp_path / "data")]),
        EXTRA_MODULES,
        tmp_path,
    )
    assert serve.returncode == 2, serve.stdout + serve.stderr
    assert "pip install 'normcore[service]'" in serve.stderr
    assert "Traceback" not in serve.stderr


def _module_level_imports(tree: ast.Module) -> set[str]:
    """Top-level package names imported when the module runs (not in functions, not typing)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                break
            if isinstance(sub, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
                names.add(sub.module.partition(".")[0])
    return names


def test_normcore_modules_import_only_the_library_dependencies() -> None:
    """The grep of the charter, on the syntax tree: no service, worker or extra at import time."""
    offenders = {}
    for path in sorted((ROOT / "normcore").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        extra = _module_level_imports(tree) - CORE_MODULES - set(sys.stdlib_module_names)
        if extra:
            offenders[str(path.relative_to(ROOT))] = sorted(extra)
    assert offenders == {}


def test_pyproject_keeps_the_library_small() -> None:
    """The library's requirements are the core set; the service's packages sit in its extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        out = set()
        for req in requirements:
            name = req.split(";")[0].split("[")[0]
            for sep in "<>=!~ ":
                name = name.split(sep)[0]
            out.add(name.strip().lower())
        return out

    core = names(project["dependencies"])
    assert core == {"torch", "numpy", "pydantic", "safetensors", "pyyaml", "rich", "typer"}
    extras = project["optional-dependencies"]
    service = names(extras["service"])
    for package in ("fastapi", "uvicorn", "sqlalchemy", "alembic", "psycopg", "celery", "redis"):
        assert package in service
    assert names(extras["onnx"]) == {"onnx", "onnxscript", "onnxruntime"}
    assert project["scripts"]["normcore"] == "service.cli:main"
    for image in ("api", "worker"):  # the images install the library's and the service's
        dockerfile = (ROOT / "docker" / f"{image}.Dockerfile").read_text()
        assert "['optional-dependencies']['service']" in dockerfile, image


@pytest.mark.parametrize("extra", ["service", "onnx", "data", "client"])
def test_test_extra_pulls_every_extra(extra: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    test = " ".join(project["optional-dependencies"]["test"])
    assert extra in test.split("normcore[", 1)[1].split("]", 1)[0].split(",")
