"""normcore.client.Client and the ``normcore`` CLI against a real API process; ``normcore serve``
as a subprocess (API + worker, admin token, Ctrl-C)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from normcore.client import ApiError, ChecksumMismatch, Client, JobFailed
from service.auth import TOKEN_CACHE_TTL_S
from service.cli import app as cli_app
from tests.harness import REPO, Proc, ServiceEnv, free_port, make_env, start_api

SPEC: dict[str, Any] = {
    "name": "client-test",
    "model": {"arch": "lenet", "norm": "bn"},
    "data": {"dataset": "synthetic", "batch_size": 8},
    "epochs": 2,
}

# One xdist worker per module, so the module-scoped server starts once.
pytestmark = pytest.mark.xdist_group("service-client")


@dataclass
class Server:
    env: ServiceEnv
    proc: Proc
    url: str
    store: Any
    token: str

    def client(self) -> Client:
        return Client(self.url, token=self.token)

    def run_job(self, job_id: str) -> int:
        """Claim a job as a worker would; returns the attempt."""
        attempt = self.store.claim_job(job_id, worker_id="test", lease_seconds=600)
        assert attempt is not None
        return attempt

    def checkpoint(self, job_id: str, attempt: int, name: str, epoch: int) -> bytes:
        import torch
        from safetensors.torch import save_file

        folder = self.env.artifact_dir / "jobs" / job_id / "checkpoints" / name
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            "bn.running_mean": torch.full((3,), float(epoch)),
            "bn.running_var": torch.ones(3),
            "bn.weight": torch.ones(3),
            "bn.bias": torch.zeros(3),
        }
        save_file(tensors, str(folder / "model.safetensors"))
        data = (folder / "model.safetensors").read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        self.store.add_checkpoint(
            job_id,
            attempt=attempt,
            name=name,
            epoch=epoch,
            step=epoch * 10,
            bytes=len(data),
            sha256=sha,
            files={"model.safetensors": sha},
            metrics={},
            path=str(folder),
        )
        return data


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = make_env(
        tmp_path_factory.mktemp("client") / "nc", NORMCORE_MAX_ACTIVE_JOBS_PER_USER="1000"
    )
    store = env.store()
    token = store.create_token("dana", "dana-token")
    proc, url = start_api(env)
    try:
        yield Server(env, proc, url, store, token)
    finally:
        proc.stop()
        store.dispose()


# ------------------------------------------------------------------------------- Client


def test_client_submit_get_list_cancel(server: Server, tmp_path: Path) -> None:
    with server.client() as client:
        job = client.submit(SPEC)
        assert job["status"] == "queued"
        assert client.get(job["id"])["id"] == job["id"]
        as_json = tmp_path / "spec.json"
        as_json.write_text(json.dumps(SPEC))
        as_yaml = tmp_path / "spec.yaml"
        as_yaml.write_text("name: from-yaml\nmodel: {arch: lenet}\ndata: {dataset: digits}\n")
        from_file = client.submit(as_json, idempotency_key="file-1")
        assert client.submit(as_json, idempotency_key="file-1")["id"] == from_file["id"]
        assert client.submit(str(as_yaml))["name"] == "from-yaml"
        listed = list(client.list(limit=2))  # follows the cursor across pages
        ids = [j["id"] for j in listed]
        assert len(ids) == len(set(ids)) >= 3
        assert {job["id"], from_file["id"]} <= set(ids)
        cancelled = client.cancel(job["id"])
        assert cancelled["status"] == "cancelled"
        assert [j["id"] for j in client.list(status="cancelled")] == [job["id"]]


def test_client_errors_carry_status_and_detail(server: Server) -> None:
    with server.client() as client:
        with pytest.raises(ApiError) as missing:
            client.get("0" * 32)
        assert missing.value.status == 404 and "not found" in missing.value.detail
        with pytest.raises(ApiError) as invalid:
            client.submit({**SPEC, "model": {"arch": "nope"}})
        assert invalid.value.status == 422
        assert invalid.value.detail[0]["loc"] == ["model", "arch"]
    with Client(server.url, token="nc_wrong") as anonymous, pytest.raises(ApiError) as denied:
        anonymous.get("0" * 32)
    assert denied.value.status == 401


def test_client_url_and_token_from_env(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMCORE_URL", server.url)
    monkeypatch.setenv("NORMCORE_TOKEN", server.token)
    with Client() as client:
        assert client.url == server.url
        assert client.submit(SPEC)["status"] == "queued"


def test_client_metrics_iter_and_wait(server: Server) -> None:
    with server.client() as client:
        job_id = client.submit(SPEC)["id"]
        attempt = server.run_job(job_id)
        server.store.add_metrics(
            job_id,
            attempt=attempt,
            rows=[{"step": 1, "epoch": 1, "split": "train", "values": {"loss": 2.0}}],
        )
        assert [r["step"] for r in client.metrics(job_id)["items"]] == [1]
        # Without until_done: what is there now, then stop.
        assert [r["step"] for r in client.iter_metrics(job_id, until_done=False)] == [1]

        def worker() -> None:
            for step in (2, 3):
                time.sleep(0.3)
                server.store.add_metrics(
                    job_id,
                    attempt=attempt,
                    rows=[{"step": step, "epoch": 1, "split": "train", "values": {}}],
                )
            server.store.add_logs(job_id, attempt=attempt, lines=[("info", "done")])
            server.store.finish_job(job_id, attempt=attempt, status="succeeded")

        thread = threading.Thread(target=worker)
        thread.start()
        rows = list(client.iter_metrics(job_id, poll=0.1))
        thread.join()
        assert [r["step"] for r in rows] == [1, 2, 3]  # each row exactly once, in order
        assert len({r["seq"] for r in rows}) == 3
        assert client.wait(job_id, timeout=10, poll=0.1)["status"] == "succeeded"
        assert [x["message"] for x in client.logs(job_id)["items"]] == ["done"]

        failing = client.submit(SPEC)["id"]
        server.store.finish_job(
            failing, attempt=server.run_job(failing), status="failed", error="diverged: loss nan"
        )
        with pytest.raises(JobFailed, match="diverged"):
            client.wait(failing, timeout=10, poll=0.1)
        with pytest.raises(TimeoutError):
            client.wait(client.submit(SPEC)["id"], timeout=0.3, poll=0.1)


def test_client_checkpoints_download_and_stats(server: Server, tmp_path: Path) -> None:
    with server.client() as client:
        job_id = client.submit(SPEC)["id"]
        attempt = server.run_job(job_id)
        server.checkpoint(job_id, attempt, "epoch-0001", 1)
        newest = server.checkpoint(job_id, attempt, "epoch-0002", 2)
        assert [c["name"] for c in client.checkpoints(job_id)] == ["epoch-0001", "epoch-0002"]
        path = client.download(job_id, path=tmp_path)  # a folder: the file goes inside
        assert path.parent == tmp_path and path.read_bytes() == newest
        named = client.download(job_id, "epoch-0001", tmp_path / "one.safetensors")
        assert named.name == "one.safetensors"
        stats = client.stats(job_id, "epoch-0002")
        assert stats["layers"][0]["running_mean"] == [2.0, 2.0, 2.0]
        # A file changed on disk after it was recorded no longer matches its ETag.
        folder = server.env.artifact_dir / "jobs" / job_id / "checkpoints" / "epoch-0002"
        (folder / "model.safetensors").write_bytes(b"tampered")
        with pytest.raises(ChecksumMismatch):
            client.download(job_id, "epoch-0002", tmp_path / "bad.safetensors")
        assert not (tmp_path / "bad.safetensors").exists()
        empty = client.submit(SPEC)["id"]
        with pytest.raises(ApiError, match="no checkpoints"):
            client.download(empty, path=tmp_path)


# ---------------------------------------------------------------------------------- CLI


@pytest.fixture
def cli(server: Server, tmp_path: Path) -> Any:
    runner = CliRunner()
    env = {
        **server.env.env,
        "NORMCORE_URL": server.url,
        "NORMCORE_TOKEN": server.token,
        "XDG_CONFIG_HOME": str(tmp_path / "config-home"),  # never the user's own config
    }

    def invoke(*args: str, **kwargs: Any) -> Any:
        result = runner.invoke(cli_app, list(args), env=env, **kwargs)
        return result

    return invoke


def test_cli_token_create_and_revoke(server: Server, cli: Any) -> None:
    created = cli("token", "create", "erin-cli", "--user", "erin")
    assert created.exit_code == 0, created.output
    token = created.output.strip()
    assert token.startswith("nc_")
    assert httpx.get(f"{server.url}/jobs", headers={"Authorization": f"Bearer {token}"}).is_success
    assert cli("token", "create", "erin-cli").exit_code == 1  # names are unique
    revoked = cli("token", "revoke", "erin-cli")
    assert revoked.exit_code == 0, revoked.output
    # The API trusts a token lookup for TOKEN_CACHE_TTL_S, so a revocation lands within it.
    deadline = time.monotonic() + TOKEN_CACHE_TTL_S + 2
    while True:
        r = httpx.get(f"{server.url}/jobs", headers={"Authorization": f"Bearer {token}"})
        if r.status_code == 401 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 401
    assert cli("token", "revoke", "erin-cli").exit_code == 1
    # The name of a revoked token is not reused, and the error says so (not just "exists").
    again = cli("token", "create", "erin-cli", "--user", "erin")
    assert again.exit_code == 1
    flat = " ".join(again.output.split())
    assert "a revoked token named 'erin-cli' exists; token names are never reused" in flat, flat
    assert "pick another name" in flat
    admin = cli("token", "create", "ops", "--admin")
    assert admin.exit_code == 0
    assert server.store.get_user("ops").admin is True


def test_cli_submit_jobs_metrics_logs_download_cancel(
    server: Server, cli: Any, tmp_path: Path
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    submitted = cli("submit", str(spec))
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", job_id)

    listed = cli("jobs", "--status", "queued")
    assert listed.exit_code == 0 and job_id in listed.output

    attempt = server.run_job(job_id)
    server.store.add_metrics(
        job_id,
        attempt=attempt,
        rows=[{"step": 7, "epoch": 1, "split": "val", "values": {"accuracy": 0.75}}],
    )
    server.store.add_logs(job_id, attempt=attempt, lines=[("info", "epoch 1 done [ok]")])
    data = server.checkpoint(job_id, attempt, "epoch-0001", 1)

    shown = cli("metrics", job_id)
    assert shown.exit_code == 0 and "accuracy=0.75" in shown.output and "val" in shown.output
    as_json = cli("metrics", job_id, "--json")
    assert json.loads(as_json.output.splitlines()[0])["values"] == {"accuracy": 0.75}
    logs = cli("logs", job_id)
    assert logs.exit_code == 0 and "epoch 1 done [ok]" in logs.output

    out = tmp_path / "model.safetensors"
    downloaded = cli("download", job_id, "-o", str(out))
    assert downloaded.exit_code == 0, downloaded.output
    assert out.read_bytes() == data

    cancelled = cli("cancel", job_id)
    assert cancelled.exit_code == 0 and "cancel requested" in cancelled.output

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SPEC, "optim": {"lr": -1}}))
    refused = cli("submit", str(bad))
    assert refused.exit_code == 1
    assert "optim.lr" in refused.output and "greater than 0" in refused.output
    assert cli("cancel", "0" * 32).exit_code == 1


def test_cli_tables_are_full_width_when_piped(
    server: Server, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CliRunner's stdout is no terminal, like `normcore jobs | cat`: no cell is cut."""
    name = "piped-table-" + "n" * 60
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SPEC, "name": name}))
    job_id = cli("submit", str(spec)).output.strip()
    server.store.finish_job(job_id, attempt=server.run_job(job_id), status="succeeded")
    monkeypatch.setenv("COLUMNS", "80")
    listed = cli("jobs")
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if job_id in line)
    assert name in row and "succeeded" in row and "…" not in listed.output


def test_cli_jobs_shows_owner_column_only_across_owners(
    server: Server, cli: Any, tmp_path: Path
) -> None:
    """A user's `normcore jobs` lists only their jobs, without an owner column; an admin's lists
    every user's, with the owner (its id: the API gives no name) on each row."""
    fay = server.store.create_token("fay", "fay-jobs")
    root = server.store.create_token("root-jobs", "root-jobs", admin=True)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SPEC, "name": "owned-by-fay"}))
    fay_job = cli("submit", str(spec), "--token", fay).output.strip()
    spec.write_text(json.dumps({**SPEC, "name": "owned-by-dana"}))
    dana_job = cli("submit", str(spec)).output.strip()  # the fixture's token: dana's

    own = cli("jobs", "--token", fay)
    assert own.exit_code == 0, own.output
    header = next(line for line in own.output.splitlines() if line.lstrip().startswith("id"))
    assert "owner" not in header.split() and fay_job in own.output and dana_job not in own.output

    every = cli("jobs", "--token", root, "--limit", "200")
    assert every.exit_code == 0, every.output
    lines = every.output.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("id"))
    assert header.split()[:3] == ["id", "owner", "name"], header
    for job_id, user in ((fay_job, "fay"), (dana_job, "dana")):
        row = next(line for line in lines if job_id in line).split()
        assert row[1] == str(server.store.get_user(user).id), row


def test_cli_submit_wait_follows_to_the_end(server: Server, cli: Any, tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SPEC, "name": "waited"}))

    def worker() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            jobs, _ = server.store.list_jobs(status="queued", limit=200)
            mine = [j for j in jobs if j.name == "waited"]
            if mine:
                break
            time.sleep(0.05)
        job_id = mine[0].id
        attempt = server.run_job(job_id)
        for epoch in (1, 2):
            server.store.add_metrics(
                job_id,
                attempt=attempt,
                rows=[
                    {
                        "step": epoch * 10,
                        "epoch": epoch,
                        "split": "train",
                        "values": {"loss": 1 / epoch},
                    },
                    {
                        "step": epoch * 10,
                        "epoch": epoch,
                        "split": "val",
                        "values": {"accuracy": 0.4 * epoch},
                    },
                ],
            )
            time.sleep(0.3)
        server.store.finish_job(job_id, attempt=attempt, status="succeeded")

    thread = threading.Thread(target=worker)
    thread.start()
    result = cli("submit", str(spec), "--wait")
    thread.join()
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.output
    assert "acc -/0.8" in result.output and "loss 0.5" in result.output


def test_cli_finds_server_and_token_by_precedence(server: Server, tmp_path: Path) -> None:
    """flag > NORMCORE_* env > `normcore login`'s config file > local default, for URL and token;
    a 401 says where the token came from and how to pass one."""
    from service.client_config import config_path

    runner = CliRunner()
    port = server.url.rsplit(":", 1)[1]
    data_dir = tmp_path / "data"
    base = {
        **server.env.env,
        "NORMCORE_DATA_DIR": str(data_dir),
        "NORMCORE_PORT": port,  # the local default URL is http://127.0.0.1:<port>
        "NORMCORE_URL": None,  # None: unset for the call
        "NORMCORE_TOKEN": None,
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
    }

    def run(*args: str, input: str | None = None, **env: str | None) -> Any:
        return runner.invoke(cli_app, list(args), env={**base, **env}, input=input)

    # Nothing anywhere: the local default URL, no token, and a 401 that says what to do.
    denied = run("jobs")
    assert denied.exit_code == 1
    for hint in ("no token was found", "--token", "NORMCORE_TOKEN", "normcore login"):
        assert hint in denied.output, denied.output
    assert "normcore token create" in denied.output
    # ... and where it looked for the local admin token, and how to point it elsewhere.
    flat = " ".join(denied.output.split())  # rich wraps long lines at the runner's width
    assert f"no local admin token at {data_dir / 'admin.token'} (no such file; " in flat, flat
    assert "the data folder is NORMCORE_DATA_DIR" in flat
    assert "set NORMCORE_DATA_DIR to the data folder `normcore serve` used" in flat
    # The local default token: the admin token file of a server on this machine.
    data_dir.mkdir()
    (data_dir / "admin.token").write_text(server.token + "\n")
    assert run("jobs").exit_code == 0
    (data_dir / "admin.token").unlink()

    # login checks the token first and saves nothing when the server refuses it.
    path = config_path({"XDG_CONFIG_HOME": base["XDG_CONFIG_HOME"]})
    refused = run("login", "--url", server.url, "--token", "nc_wrong")
    assert refused.exit_code == 1 and "401" in refused.output and not path.exists()
    saved = run("login", "--url", server.url + "/", input=server.token + "\n")  # asked, hidden
    assert saved.exit_code == 0, saved.output
    assert server.token not in saved.output
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert tomllib.loads(path.read_text()) == {"url": server.url, "token": server.token}

    # The config file alone: its URL beats the local default (pointed at a dead port here).
    dead = str(free_port())
    assert run("jobs", NORMCORE_PORT=dead).exit_code == 0
    # The environment beats the config file; the message names the source of the bad token.
    env_wins = run("jobs", NORMCORE_TOKEN="nc_wrong")
    assert env_wins.exit_code == 1 and "the token came from NORMCORE_TOKEN" in env_wins.output
    # A flag beats the environment.
    assert run("jobs", "--token", server.token, NORMCORE_TOKEN="nc_wrong").exit_code == 0
    # The saved token goes only to the saved server: another URL (here another name for the
    # same server) gets no token at all rather than a token meant for somewhere else.
    other = f"http://localhost:{port}"
    kept = run("jobs", NORMCORE_URL=other)
    assert kept.exit_code == 1 and f"no token was found for {other}" in kept.output
    unreachable = run("jobs", "--url", f"http://127.0.0.1:{dead}")
    assert unreachable.exit_code == 1
    assert f"cannot reach the server at http://127.0.0.1:{dead} (from --url)" in unreachable.output


def test_no_token_hint_names_the_admin_token_path_it_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run from a directory other than the one `normcore serve` ran in, with NORMCORE_DATA_DIR
    unset: the 401 hint names the ./normcore-data/admin.token it tried, resolved against the
    current directory, and how to point the CLI at the server's folder."""
    from service.cli import _auth_hint, _credentials

    for name in ("NORMCORE_DATA_DIR", "NORMCORE_TOKEN", "NORMCORE_URL", "NORMCORE_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    creds = _credentials(None, None)
    assert creds.token is None
    hint = _auth_hint(creds)
    tried = tmp_path / "normcore-data" / "admin.token"
    assert f"no local admin token at {tried} (no such file; NORMCORE_DATA_DIR is unset" in hint
    assert "./normcore-data in the current directory" in hint
    for way in ("--token", "NORMCORE_TOKEN", "normcore login", "set NORMCORE_DATA_DIR"):
        assert way in hint, hint
    # An empty token file is named as such; a filled one is used, from any directory.
    tried.parent.mkdir()
    tried.write_text("\n")
    assert f"{tried} (empty; " in _auth_hint(_credentials(None, None))
    tried.write_text("nc_local\n")
    monkeypatch.setenv("NORMCORE_DATA_DIR", str(tried.parent))
    monkeypatch.chdir(tmp_path / "xdg" if (tmp_path / "xdg").is_dir() else "/")
    found = _credentials(None, None)
    assert (found.token, found.token_source) == ("nc_local", str(tried))
    # A server elsewhere: the file is not looked for, and the hint says why.
    remote = _credentials("http://203.0.113.7:8000", None)
    assert remote.token is None
    assert "only a server on this machine" in _auth_hint(remote)


def test_config_dir_follows_xdg() -> None:
    from service.client_config import config_dir

    assert config_dir({"XDG_CONFIG_HOME": "/etc/xdg-test"}) == Path("/etc/xdg-test/normcore")
    home = Path.home() / ".config" / "normcore"
    assert config_dir({}) == home
    assert config_dir({"XDG_CONFIG_HOME": ""}) == home  # empty or relative: ignored (XDG spec)
    assert config_dir({"XDG_CONFIG_HOME": "rel/dir"}) == home


def test_progress_line_reads_engine_metric_names() -> None:
    from service.cli import _progress_info

    last = {
        "train": {"loss": 1.0368, "lr": 0.01},
        "val": {"train_accuracy": 0.4427, "val_loss": 1.0738, "val_accuracy": 0.451},
    }
    assert _progress_info(last) == "loss 1.04 val 1.07 acc 0.443/0.451"
    assert _progress_info({}) == ""


# --------------------------------------------------------------------------------- serve


def _serve(data_dir: Path, port: int, *extra: str, env: dict[str, str] | None = None) -> Any:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NORMCORE_")}
    full_env.update(env or {})
    full_env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            *extra,
        ],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _read_until(proc: Any, pattern: str, timeout: float = 90) -> str:
    """Read the process's output until a line matches; return everything read."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    raise AssertionError(f"no {pattern!r} in output:\n{''.join(seen)}")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_serve_runs_api_and_worker_with_admin_token(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    proc = _serve(data_dir, port)
    try:
        out = _read_until(proc, r"Ctrl-C")
        token_file = data_dir / "admin.token"
        token = token_file.read_text().strip()
        assert token.startswith("nc_")
        # Written to its 0600 file and never to stdout, which often ends up in a log file.
        assert token not in out and str(token_file) in out
        assert token_file.stat().st_mode & 0o777 == 0o600
        pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
        assert len(pids) == 2, out  # the API and the worker
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"http://127.0.0.1:{port}/jobs", headers=headers).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/jobs").status_code == 401
        assert all(not _gone(pid) for pid in pids)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert all(_gone(pid) for pid in pids)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()

    # A second start reuses the token and says where it is, and makes the data folder private
    # again (the files in it were all written 0600).
    assert all(p.stat().st_mode & 0o077 == 0 for p in [data_dir, *data_dir.rglob("*")])
    data_dir.chmod(0o755)
    proc = _serve(data_dir, port, "--no-worker")
    try:
        out = _read_until(proc, r"Ctrl-C")
        assert token not in out and str(data_dir / "admin.token") in out
        assert data_dir.stat().st_mode & 0o777 == 0o700
        assert httpx.get(f"http://127.0.0.1:{port}/jobs", headers=headers).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


def test_serve_refuses_auth_off_beyond_loopback(tmp_path: Path) -> None:
    proc = _serve(
        tmp_path / "data", free_port(), "--host", "0.0.0.0", env={"NORMCORE_AUTH": "false"}
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "loopback" in out
    assert not (tmp_path / "data" / "normcore.db").exists()


def test_worker_command_execs_python_m_worker() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "python -m worker" in done.stdout and "--queues" in done.stdout
