"""The ``normcore`` command: run the service (``serve``, ``worker``), manage tokens, and talk to
a running server (``submit``, ``jobs``, ``metrics``, ``download``, ``cancel``, ``logs``)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.client_config import Credentials

if TYPE_CHECKING:
    from collections.abc import Iterator

    from normcore.client import Client

app = typer.Typer(
    name="normcore",
    help="Train normalized CNNs locally or through the normcore service.",
    no_args_is_help=True,
    add_completion=False,
)
token_app = typer.Typer(help="Create and revoke API tokens (works on the local store).")
app.add_typer(token_app, name="token")

# Piped or redirected output (`normcore jobs | cat`, a file) is laid out this wide: tables keep
# every cell whole instead of being cut or wrapped at 80 columns (or the terminal's width).
PIPE_WIDTH = 10_000


class _Console(Console):
    """A rich Console as wide as PIPE_WIDTH when its file is not a terminal."""

    @property
    def size(self) -> ConsoleDimensions:
        """The terminal's size, or (PIPE_WIDTH, its height) when writing to a pipe or file."""
        dims = Console.size.fget(self)  # type: ignore[attr-defined]
        return dims if self.is_terminal else ConsoleDimensions(PIPE_WIDTH, dims.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


console = _Console(soft_wrap=True)
err_console = Console(stderr=True)

DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="NORMCORE_DATA_DIR", help="Local state folder."),
]
UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Server URL (else NORMCORE_URL, then the `normcore login` config, then "
        "http://NORMCORE_HOST:NORMCORE_PORT).",
        show_default=False,
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="API token (else NORMCORE_TOKEN, then the `normcore login` config, then a local "
        "server's <data_dir>/admin.token).",
        show_default=False,
    ),
]


def _settings(data_dir: Path | None = None, **overrides: Any) -> Any:
    """Settings from the environment, with explicit CLI options on top."""
    from pydantic import ValidationError

    from service.settings import Settings

    kwargs = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    try:
        return Settings(**kwargs)
    except ValidationError as exc:
        msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        err_console.print(f"[red]invalid settings:[/red] {msgs}")
        raise typer.Exit(2) from None


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def _load_spec_file(path: Path) -> dict[str, Any]:
    """The JSON/YAML spec in ``path``, read here before any server is asked; a file that cannot
    be used (missing, a folder, not UTF-8, bad JSON/YAML, a YAML tag, not a mapping) exits 2
    with one line naming the file and the reason."""
    from normcore.client import SpecFileError, read_spec

    try:
        return read_spec(path)
    except SpecFileError as exc:
        raise _fail(f"{path}: {exc}", 2) from None


def _api_error(exc: Any) -> typer.Exit:
    detail = exc.detail
    if isinstance(detail, list):
        lines = [
            f"  {'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}"
            if isinstance(d, dict)
            else f"  {d}"
            for d in detail
        ]
        return _fail(f"HTTP {exc.status}\n" + "\n".join(lines))
    if isinstance(detail, dict):
        detail = detail.get("message") or json.dumps(detail)
    return _fail(f"HTTP {exc.status}: {detail}")


DEFAULT_URL = "http://127.0.0.1:8000"


def _credentials(url: str | None, token: str | None) -> Credentials:
    """The server and token to use, by flag > environment > config file > local default
    (service/client_config.py); exits with a message when the config file is unreadable."""
    from urllib.parse import urlsplit

    from pydantic import ValidationError

    from service.auth import is_loopback
    from service.client_config import ConfigError, resolve
    from service.settings import Settings

    try:
        settings: Any = Settings()
    except ValidationError:  # server-side settings a client does not need; use the defaults
        settings = None
    default_url = DEFAULT_URL
    if settings is not None:
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        default_url = f"http://{host}:{settings.port}"
    try:
        creds = resolve(url_flag=url, token_flag=token, default_url=default_url)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    if creds.token is not None:
        return creds
    if not is_loopback(urlsplit(creds.url).hostname):
        why = "not looked for: only a server on this machine (a loopback URL) has one here"
        return dataclasses.replace(creds, local_token=f"<data_dir>/admin.token ({why})")
    if settings is None:
        why = "not looked for: the NORMCORE_* settings are invalid"
        return dataclasses.replace(creds, local_token=f"<data_dir>/admin.token ({why})")
    # A server on this machine: the admin token `normcore serve` wrote, if we can read it.
    path = Path(settings.data_dir) / "admin.token"
    try:
        local = path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        problem = "no such file"
    except (OSError, UnicodeDecodeError) as exc:
        problem = f"unreadable: {getattr(exc, 'strerror', None) or exc}"
    else:
        if local:
            return Credentials(creds.url, local, creds.url_source, str(path))
        problem = "empty"
    if os.environ.get("NORMCORE_DATA_DIR"):
        origin = "the data folder is NORMCORE_DATA_DIR"
    else:
        origin = (
            "NORMCORE_DATA_DIR is unset, so the data folder is ./normcore-data in the current "
            "directory; `normcore serve` writes it in the folder it was started from"
        )
    return dataclasses.replace(creds, local_token=f"{path} ({problem}; {origin})")


def _client(url: str | None, token: str | None) -> tuple[Client, Credentials]:
    """A Client for the resolved server and token, and the Credentials it was built from."""
    from normcore.client import Client

    creds = _credentials(url, token)
    # token "" (not None) when there is none: Client would read NORMCORE_TOKEN again otherwise.
    return Client(creds.url, token=creds.token or ""), creds


def _auth_hint(creds: Credentials) -> str:
    """What to do about a 401: where the token came from and every way to pass one."""
    from service.client_config import config_path

    if creds.token:
        used = f"the token came from {creds.token_source}"
    else:
        used = (
            f"no token was found for {creds.url}: not --token, not NORMCORE_TOKEN, none saved "
            f"for this URL in {config_path()}"
        )
        if creds.local_token:
            used += f", and no local admin token at {creds.local_token}"
    return (
        f"{used}. Pass one with --token, the NORMCORE_TOKEN environment variable, or "
        f"`normcore login --url {creds.url} --token TOKEN` (saves both to {config_path()}); "
        "on the server's machine, set NORMCORE_DATA_DIR to the data folder `normcore serve` "
        "used (it writes the first admin token to <data_dir>/admin.token) and the CLI reads "
        "that token from any directory; an admin creates tokens with "
        "`normcore token create NAME`."
    )


@contextlib.contextmanager
def _api_errors(creds: Credentials | None = None) -> Iterator[None]:
    """Turn ApiError and connection failures into a one-line message and exit code 1; a 401
    says how to pass a token."""
    import httpx

    from normcore.client import ApiError, JobFailed

    try:
        yield
    except ApiError as exc:
        if exc.status == 401 and creds is not None:
            detail = exc.detail.get("message") if isinstance(exc.detail, dict) else exc.detail
            raise _fail(f"HTTP 401: {detail}\n{_auth_hint(creds)}") from None
        raise _api_error(exc) from None
    except JobFailed as exc:
        raise _fail(str(exc)) from None
    except httpx.HTTPError as exc:
        where = f" at {creds.url} (from {creds.url_source})" if creds is not None else ""
        raise _fail(f"cannot reach the server{where}: {exc}") from None


# --------------------------------------------------------------------------- running the service

# Files the service writes are its user's alone: folders 0700, files 0600 (database, broker,
# checkpoints, the admin token). Children inherit the umask, the training child included.
PRIVATE_UMASK = 0o077


def _private_dir(path: Path, *, tighten: bool) -> None:
    """Create ``path`` (and missing parents) 0700; with ``tighten``, set an existing one to 0700
    too (a warning, not an error, when that is not allowed)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if tighten and path.stat().st_mode & 0o777 != 0o700:
        try:
            os.chmod(path, 0o700)
        except OSError as exc:
            err_console.print(f"[yellow]warning:[/yellow] cannot make {path} private: {exc}")


def _supervisor_logging() -> None:
    """Send the supervisor's lines (deaths, restarts, stops) to stderr with a timestamp."""
    import logging

    logger = logging.getLogger("normcore.supervisor")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s normcore serve: %(message)s")
        )
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _wait_healthy(url: str, alive: Any, stopping: Any, timeout: float = 60.0) -> bool:
    """Poll ``url``/healthz until it answers 200; False once ``alive()`` is false, ``stopping()``
    is true, or ``timeout`` seconds passed."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive() and not stopping():
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return True
        time.sleep(0.2)
    return False


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind.", show_default=False)] = None,
    port: Annotated[int | None, typer.Option(help="TCP port.", show_default=False)] = None,
    data_dir: DataDirOpt = None,
    worker: Annotated[
        bool, typer.Option("--worker/--no-worker", help="Start one worker beside the API.")
    ] = True,
) -> None:
    """Embedded mode: migrate the store, make sure an admin token exists, run API + one worker.

    Both run under a supervisor (service/supervisor.py): a child that dies is restarted with
    backoff, the other keeps running. Ctrl-C or SIGTERM stops the worker, then the API; exit 0.
    """
    from service import api_server
    from service.auth import InsecureConfigError, check_auth_allowed, ensure_admin_token
    from service.supervisor import ChildSpec, Supervisor, listen, port_in_use_message

    os.umask(PRIVATE_UMASK)
    settings = _settings(data_dir, host=host, port=port)
    try:
        check_auth_allowed(settings.auth, settings.host)
    except InsecureConfigError as exc:
        raise _fail(str(exc), 2) from None
    # The data folder is ours: made private even if it exists. A datasets or artifacts folder
    # set elsewhere (a lab's shared datasets) keeps its mode; created here, it is 0700.
    _private_dir(settings.data_dir, tighten=True)
    for folder in (settings.data_root, settings.artifact_dir):
        _private_dir(folder, tighten=settings.data_dir in folder.parents)
    try:
        # Held here, not by uvicorn: the port stays bound (and requests queue) across restarts.
        sock = listen(settings.host, settings.port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise _fail(port_in_use_message(settings.host, settings.port)) from None
        raise _fail(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from None
    bound_port = sock.getsockname()[1]  # the one the kernel chose for --port 0
    # The children's settings: in this process's environment, which the worker inherits and the
    # fork server of the API processes copies when it starts.
    os.environ.update(
        {
            "NORMCORE_DATA_DIR": str(settings.data_dir),
            "NORMCORE_DATABASE_URL": settings.database_url,
            "NORMCORE_BROKER_URL": settings.broker_url,
            "NORMCORE_ARTIFACT_DIR": str(settings.artifact_dir),
            "NORMCORE_DATA_ROOT": str(settings.data_root),
            "NORMCORE_HOST": settings.host,
            "NORMCORE_PORT": str(bound_port),
            "NORMCORE_AUTH": "true" if settings.auth else "false",
        }
    )
    os.environ.pop("NORMCORE_TOKEN", None)  # a client setting; the children need no token
    specs = []
    if worker:
        # Started first: its imports (torch) run while the API starts. It stops
        # first too, with the time a running job needs to checkpoint and exit.
        # --api-beside: the worker's default training thread count keeps a core for the API
        # --supervisor-pid: it stops when this process dies, even of kill -9 (no orphan)
        worker_cmd = [sys.executable, "-m", "worker", "--api-beside"]
        worker_cmd += ["--supervisor-pid", str(os.getpid())]
        specs.append(
            ChildSpec("worker", worker_cmd, stop_timeout=settings.cancel_grace_seconds + 5)
        )
    specs.append(ChildSpec("api", target=api_server.run, args=(sock,), stop_timeout=15.0))
    _supervisor_logging()
    supervisor = Supervisor(specs, preload=api_server.PRELOAD)
    # The API's fork server imports the app's modules while this process migrates the store.
    supervisor.start_fork_server()
    from service.store import Store

    store = Store.from_settings(settings)
    try:
        store.upgrade()
        # The token goes to its file only, never to stdout: a log capturing stdout stays clean.
        _, token_path = ensure_admin_token(store, settings) if settings.auth else (None, None)
    finally:
        store.dispose()
    shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{shown_host}:{bound_port}"

    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        supervisor.start()
        api = supervisor.child("api")
        if not _wait_healthy(url, api.alive, lambda: stopping):
            if not stopping:
                raise _fail("the API did not come up; see its output above")
        else:
            console.print(
                f"[green]normcore serving[/green] at {url}  (docs: {url}/docs)", soft_wrap=True
            )
            console.print(", ".join(f"{c.spec.name} pid {c.pid}" for c in supervisor.children))
            if not settings.auth:
                console.print(
                    "[yellow]auth is off[/yellow]: loopback clients act as the local admin",
                    soft_wrap=True,
                )
            else:
                console.print(
                    f"admin token: in {token_path} (mode 0600; the normcore CLI on this machine "
                    f"reads it; for curl: export NORMCORE_TOKEN=$(cat {token_path}))",
                    soft_wrap=True,
                    highlight=False,
                )
            console.print("Ctrl-C stops the worker, then the API.")
        while not stopping:
            supervisor.check()
            time.sleep(0.2)
    finally:
        console.print("stopping ...")
        supervisor.stop(order=["worker"] if worker else None)
        sock.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def worker(ctx: typer.Context) -> None:
    """Run a worker: python -m worker with the given arguments (--queues, --concurrency)."""
    os.umask(PRIVATE_UMASK)  # as under serve: the files it and its jobs write are 0600
    args = [sys.executable, "-m", "worker", *ctx.args]
    os.execv(sys.executable, args)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="A unique name for the token.")],
    admin: Annotated[bool, typer.Option(help="The user is an admin (sees every job).")] = False,
    user: Annotated[
        str | None, typer.Option(help="User the token belongs to (default: NAME).")
    ] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Create a token and print it (it is shown only this once)."""
    from service.store import Store

    settings = _settings(data_dir)
    store = Store.from_settings(settings)
    try:
        store.upgrade()
        token = store.create_token(user or name, name, admin=admin)
    except Exception as exc:
        raise _fail(f"cannot create token {name!r}: {exc}") from None
    finally:
        store.dispose()
    print(token)


@token_app.command("revoke")
def token_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    data_dir: DataDirOpt = None,
) -> None:
    """Revoke a token by name."""
    from service.store import Store

    settings = _settings(data_dir)
    store = Store.from_settings(settings)
    try:
        store.upgrade()
        ok = store.revoke_token(name)
    finally:
        store.dispose()
    if not ok:
        raise _fail(f"no active token named {name!r}")
    console.print(f"revoked {name}")


# --------------------------------------------------------------------------- talking to a server


@app.command()
def login(
    url: Annotated[str, typer.Option("--url", help="Server URL, e.g. http://host:8000.")],
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="API token (asked for, hidden, when left out: keeps it out of shell history).",
            show_default=False,
        ),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Try the token on the server first.")
    ] = True,
) -> None:
    """Save a server URL and token for the client commands (a 0600 file in your home)."""
    from normcore.client import Client
    from service.client_config import ConfigError, config_path, write_config

    if token is None:
        token = typer.prompt("token", hide_input=True)
    url, token = url.strip().rstrip("/"), token.strip()
    if not url.startswith(("http://", "https://")) or not token:
        raise _fail("--url must start with http:// or https:// and the token must not be empty")
    if check:
        creds = Credentials(url, token, "--url", "--token")
        with Client(url, token=token) as client, _api_errors(creds):
            next(iter(client.list(limit=1)), None)
    path = config_path()
    try:
        write_config(path, url=url, token=token)
    except (ConfigError, OSError) as exc:
        raise _fail(f"cannot save {path}: {exc}") from None
    console.print(f"saved the URL and token for {url} to {path} (mode 0600)", highlight=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def _pick(values: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` present in ``values``, else None."""
    return next((values[n] for n in names if values.get(n) is not None), None)


def _progress_info(last: dict[str, dict[str, Any]]) -> str:
    """'loss 0.41 val 0.35 acc 0.88/0.90' (train/val) from the latest rows of each split.

    The engine logs per-step rows in split "train" (loss) and per-epoch rows in split "val"
    (val_loss, val_accuracy, train_accuracy); bare names are accepted as well.
    """
    train, val = last.get("train", {}), last.get("val", {})
    loss = _pick(train, "loss", "train_loss")
    val_loss = _pick(val, "val_loss", "loss")
    train_acc = _pick(val, "train_accuracy") or _pick(train, "accuracy", "acc")
    val_acc = _pick(val, "val_accuracy", "accuracy", "acc")
    parts = []
    if loss is not None:
        parts.append(f"loss {_fmt(loss)}")
    if val_loss is not None:
        parts.append(f"val {_fmt(val_loss)}")
    if train_acc is not None or val_acc is not None:
        parts.append(f"acc {_fmt(train_acc)}/{_fmt(val_acc)}")
    return " ".join(parts)


def _watch(client: Any, job: dict[str, Any]) -> dict[str, Any]:
    """A live progress bar (epoch, loss, accuracy) until the job finishes."""
    total = float(job.get("spec", {}).get("epochs") or 1)
    last: dict[str, dict[str, Any]] = {}
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=10),
        TextColumn("epoch {task.completed:.1f}/{task.total:g}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(job["id"][:8], total=total, info="queued")
        # Live rows: the bar shows the newest values; a row a resume rewrites just overwrites.
        for row in client.iter_metrics(job["id"], poll=1.0, final=False):
            last[row["split"]] = row["values"]
            epoch = row.get("epoch") or 0
            progress.update(task, completed=min(float(epoch), total), info=_progress_info(last))
    return client.get(job["id"])


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="JSON or YAML spec.")],
    wait: Annotated[bool, typer.Option(help="Follow the job with a live progress bar.")] = False,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Retry-safe submission key.", show_default=False)
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Submit a job spec; prints the job id (and with --wait, follows it to the end)."""
    body = _load_spec_file(spec)
    client, creds = _client(url, token)
    with _api_errors(creds):
        job = client.submit(body, idempotency_key=idempotency_key)
        if not wait:
            print(job["id"])
            return
        console.print(f"submitted {job['id']} ({job['name']}) to queue {job['queue']}")
        job = _watch(client, job)
    style = {"succeeded": "green", "failed": "red"}.get(job["status"], "yellow")
    console.print(f"job {job['id']} [{style}]{job['status']}[/{style}]")
    if job.get("error"):
        console.print(job["error"])
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@app.command()
def validate(
    spec: Annotated[Path, typer.Argument(help="JSON or YAML spec.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    strict: Annotated[bool, typer.Option(help="Exit 1 when there are warnings.")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Check a spec without training: each norm layer's effective batch, the running-stats
    momentum's half-life, steps, parameters, memory, and warnings with their reasons."""
    body = _load_spec_file(spec)
    client, creds = _client(url, token)
    with _api_errors(creds):
        report = client.validate(body)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_validation(report)
    if strict and report["warnings"]:
        raise typer.Exit(1)


def _print_validation(report: dict[str, Any]) -> None:
    """The validate report as a table of norm layers, a summary and the warnings."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("layer", "kind", "map", "batch/device", "stats batch", "values", "half-life"):
        table.add_column(column, no_wrap=True)
    for row in report["layers"]:
        h = row["half_life_steps"]
        table.add_row(
            row["name"],
            row["kind"] + (" (sync)" if row["synced"] else ""),
            "-" if row["map_size"] is None else "x".join(map(str, row["map_size"])),
            str(row["per_device_batch"]),
            "-" if row["norm_batch"] is None else str(row["norm_batch"]),
            str(row["values_per_stat"]),
            "-" if h is None else f"{h:.2f} steps",
        )
    console.print(table)
    stats = report["running_stats"]
    memory = (report.get("memory_mb") or {}).get("total_mb")
    lines = [
        f"{report['world_size']} process(es) x {report['per_device_batch']} = global batch "
        f"{report['global_batch']}; {report['steps_per_epoch']} steps/epoch, "
        f"{report['total_steps']} in the run",
        f"{report['parameters']:,} parameters"
        + (f", about {memory:.1f} MB" if memory is not None else ""),
    ]
    if stats.get("half_life_steps") is not None:
        lines.append(
            f"momentum {stats['momenta'][0]:g}: half-life {stats['half_life_steps']:.2f} steps, "
            f"{stats['half_lives_in_run']:.1f} half-lives in the run"
        )
    if stats.get("cumulative_meaning"):
        lines.append(stats["cumulative_meaning"])
    lines.extend(report["notes"])
    for line in lines:
        console.print(line, highlight=False, markup=False)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning[/yellow] {warning['code']}: ", end="")
        console.print(warning["message"], highlight=False, markup=False)
    if not report["warnings"]:
        console.print("[green]no warnings[/green]")


@app.command()
def jobs(
    status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many jobs.")] = 50,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """List jobs, newest first; an owner column when they belong to more than one user (an
    admin sees every user's jobs)."""
    from itertools import islice

    client, creds = _client(url, token)
    with _api_errors(creds):
        listed = list(islice(client.list(status=status, limit=min(limit, 200)), limit))
    console.print(_jobs_table(listed))


def _jobs_table(listed: list[dict[str, Any]]) -> Table:
    """The jobs as a table: id, name, status, try, queue, created, and an owner column (the
    owner's id: the API gives no name) when more than one owner is listed."""
    owners = {str(job.get("owner_id")) for job in listed}
    show_owner = len(owners) > 1
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=32)
    if show_owner:
        table.add_column("owner", no_wrap=True)
    table.add_column("name", overflow="ellipsis", no_wrap=True)
    for column in ("status", "try", "queue", "created"):
        table.add_column(column, no_wrap=True)
    for job in listed:
        table.add_row(
            job["id"],
            *([_fmt(job.get("owner_id"))] if show_owner else []),
            job["name"],
            job["status"],
            str(job["attempt"]),
            job["queue"],
            str(job["created_at"])[5:16].replace("T", " "),
        )
    return table


@app.command()
def metrics(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    follow: Annotated[
        bool, typer.Option(help="Keep printing new rows until the job ends.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per row.")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Print a job's metric rows."""
    client, creds = _client(url, token)
    with _api_errors(creds):
        for row in client.iter_metrics(job_id, until_done=follow):
            if as_json:
                print(json.dumps(row))
                continue
            values = "  ".join(f"{k}={_fmt(v)}" for k, v in row["values"].items())
            console.print(
                f"{row['seq']:>6}  epoch {_fmt(row['epoch']):>6}  step {row['step']:>7}  "
                f"{row['split']:<6} {values}",
                highlight=False,
            )


@app.command()
def download(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    name: Annotated[str | None, typer.Argument(help="Checkpoint (default: the newest).")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File or folder.")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Download a checkpoint's model.safetensors, verified against its sha256."""
    from normcore.client import ChecksumMismatch

    client, creds = _client(url, token)
    with _api_errors(creds):
        try:
            path = client.download(job_id, name, output)
        except ChecksumMismatch as exc:
            raise _fail(str(exc)) from None
    console.print(f"saved {path}")


@app.command()
def export(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    name: Annotated[str | None, typer.Argument(help="Checkpoint (default: the newest).")] = None,
    format: Annotated[str, typer.Option("--format", help="Export format.")] = "onnx",
    fold_bn: Annotated[
        bool, typer.Option("--fold-bn/--no-fold-bn", help="Fold BN into the conv before it.")
    ] = True,
    preprocessing: Annotated[
        bool,
        typer.Option(
            "--preprocessing/--no-preprocessing",
            help="Normalize in the graph: its input is the raw image in [0, 1].",
        ),
    ] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File or folder.")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Export a checkpoint to ONNX (built by a worker) and print its equivalence certificate."""
    from normcore.client import ChecksumMismatch

    client, creds = _client(url, token)
    with _api_errors(creds):
        try:
            path, cert = client.export(
                job_id,
                name,
                output,
                format=format,
                fold_bn=fold_bn,
                preprocessing=preprocessing,
            )
        except (ChecksumMismatch, TimeoutError) as exc:
            raise _fail(str(exc)) from None
    console.print(f"saved {path}", highlight=False, markup=False)
    verdict = "within" if cert.get("within_tolerance") else "NOT within"
    probe = cert.get("probe") or {}
    console.print(
        f"max |onnxruntime - eager| = {_fmt(cert.get('max_abs_diff'))} over "
        f"{probe.get('size')} {probe.get('split')} images ({verdict} {cert.get('tolerance')}); "
        f"onnxruntime {cert.get('onnxruntime')}, opset {cert.get('opset')}",
        highlight=False,
        markup=False,
    )
    folded = cert.get("folded_layers") or []
    console.print(
        f"folded BN layers ({len(folded)}): {', '.join(folded) or '(none)'}",
        highlight=False,
        markup=False,
    )


def recalibrated_line(result: dict[str, Any], batches: int) -> str:
    """The new checkpoint's name and the batches its statistics came from: a training set
    shorter than ``batches`` yields fewer (``batches_used``), and the name keeps those asked for."""
    name = result.get("name")
    used = result.get("batches_used")
    if used is None or int(used) >= batches:
        return f"checkpoint {name} (over {batches} batches)"
    return (
        f"checkpoint {name}: over {used} of the {batches} batches asked for (the training set "
        f"holds no more; the name keeps the {batches} asked for)"
    )


@app.command()
def recalibrate(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    name: Annotated[str, typer.Argument(help="Checkpoint.")],
    batches: Annotated[int, typer.Option("--batches", min=1, help="Training batches.")] = 50,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Recompute a checkpoint's BN statistics over training batches (precise BN, on a worker);
    prints the new checkpoint's validation metrics beside the original's."""
    client, creds = _client(url, token)
    with _api_errors(creds):
        try:
            art = client.recalibrate(job_id, name, batches)
        except TimeoutError as exc:
            raise _fail(str(exc)) from None
    result = art.get("result") or {}
    console.print(recalibrated_line(result, batches), highlight=False, markup=False)
    before = result.get("original_metrics") or {}
    for key, value in (result.get("metrics") or {}).items():
        console.print(
            f"  {key}: {_fmt(value)} (was {_fmt(before.get(key))} in {name})",
            highlight=False,
            markup=False,
        )


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Ask a job to stop."""
    client, creds = _client(url, token)
    with _api_errors(creds):
        job = client.cancel(job_id)
    state = "cancel requested" if job["status"] == "running" else job["status"]
    console.print(f"job {job_id}: {state}")


@app.command()
def tag(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    add: Annotated[list[str] | None, typer.Option("--add", help="Add this tag.")] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", help="Remove this tag.")] = None,
    note: Annotated[str | None, typer.Option(help='Set the job\'s note ("" removes it).')] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Add or remove a job's tags and set its note (PATCH /jobs/{id})."""
    if not add and not remove and note is None:
        raise _fail("nothing to change: give --add, --remove or --note")
    client, creds = _client(url, token)
    with _api_errors(creds):
        job = client.label(job_id, add=add or (), remove=remove or (), note=note)
    tags = ", ".join(job["spec"].get("tags", [])) or "(none)"
    console.print(f"job {job_id}: tags {tags}", highlight=False, markup=False)
    if job.get("note"):
        console.print(f"note: {job['note']}", highlight=False, markup=False)


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Print a job's log lines."""
    client, creds = _client(url, token)
    with _api_errors(creds):
        after = 0
        while True:
            page = client.logs(job_id, after=after)
            for line in page["items"]:
                console.print(
                    f"{str(line['time'])[:19]} {line['level']:<7} {line['message']}",
                    highlight=False,
                    markup=False,
                )
            if page["next"] == after or not page["items"]:
                break
            after = page["next"]


@app.command(
    "train",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def train(ctx: typer.Context) -> None:
    """Train a job spec locally, no server needed (normcore train --help for options)."""
    # Forwarded rather than mounted: normcore.cli imports torch, which would slow every command.
    try:
        from normcore.cli import app as normcore_app
    except ImportError as exc:
        raise _fail(f"normcore train is not available: {exc}") from None
    normcore_app(args=["train", *ctx.args], prog_name="normcore")


SWEEP_ACTIONS = ("report", "show", "cancel")


def _sweep_table(report: dict[str, Any]) -> Table:
    """The report's table: one row per cell, its axis values, n, final and best mean ± sd."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=report["name"])
    for axis in report["axes"]:
        table.add_column(axis, no_wrap=True)
    table.add_column("n", justify="right")
    table.add_column(f"final {report['metric']}", justify="right")
    table.add_column(f"best {report['metric']}", justify="right")
    table.add_column("best epochs", justify="right")

    def pm(mean: float | None, std: float | None) -> str:
        if mean is None:
            return "-"
        return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")

    for cell in report["cells"]:
        table.add_row(
            *(_fmt(cell["values"][a]) for a in report["axes"]),
            str(cell["n"]),
            pm(cell["final_mean"], cell["final_std"]),
            pm(cell["best_mean"], cell["best_std"]),
            ",".join(str(e) for e in cell["best_epochs"]) or "-",
        )
    return table


def _sweep_summary(sweep: dict[str, Any]) -> str:
    """One line: "sweep ID succeeded: 12 runs, 3 released; 2 succeeded, 1 running" (zero
    counts left out, as in the progress bar)."""
    counts = ", ".join(f"{v} {k}" for k, v in sweep["counts"].items() if v) or "no runs yet"
    return (
        f"sweep {sweep['id']} {sweep['status']}: {sweep['runs']} runs, "
        f"{sweep['released']} released; {counts}"
    )


def _watch_sweep(client: Any, sweep: dict[str, Any]) -> dict[str, Any]:
    """A progress bar over the sweep's runs (ended / all) until every run ended."""
    ended = ("succeeded", "failed", "cancelled", "timed_out", "deleted")
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=20),
        TextColumn("{task.completed:.0f}/{task.total:.0f} runs"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(sweep["name"], total=sweep["runs"], info="")
        while True:
            counts = sweep["counts"]
            info = " ".join(f"{k} {v}" for k, v in counts.items() if v)
            progress.update(task, completed=sum(counts.get(k, 0) for k in ended), info=info)
            if sweep["status"] in ("succeeded", "failed", "cancelled"):
                return sweep
            time.sleep(1.0)
            sweep = client.get_sweep(sweep["id"])


@app.command()
def sweep(
    target: Annotated[
        str,
        typer.Argument(
            help="A sweep file (JSON or YAML: base, grid, seeds, metric, ...), or one of "
            "report, show, cancel followed by a sweep id."
        ),
    ],
    sweep_id: Annotated[
        str | None, typer.Argument(help="The sweep id (with report, show, cancel).")
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Follow the runs with a progress bar; print the table.")
    ] = False,
    fmt: Annotated[
        str, typer.Option("--format", help="report: table, json, csv, svg or png.")
    ] = "table",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="report: write to this file.")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Retry-safe submission key.", show_default=False)
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Submit a sweep (`normcore sweep FILE [--wait]`), or read one: `normcore sweep report ID
    --format csv|svg`, `normcore sweep show ID`, `normcore sweep cancel ID`."""
    body: dict[str, Any] | None = None
    if target not in SWEEP_ACTIONS:
        if not Path(target).exists():
            raise _fail(f"{target}: no such sweep file (or use report, show, cancel)", 2)
        body = _load_spec_file(Path(target))
    client, creds = _client(url, token)
    with _api_errors(creds):
        if target in SWEEP_ACTIONS:
            if not sweep_id:
                raise _fail(f"normcore sweep {target} needs a sweep id", 2)
            if target == "cancel":
                done = client.cancel_sweep(sweep_id)
                console.print(f"sweep {sweep_id} cancel requested ({done['status']})")
                return
            if target == "show" or fmt == "table":
                if target == "show":
                    s = client.get_sweep(sweep_id)
                    console.print(_sweep_summary(s), highlight=False)
                console.print(_sweep_table(client.sweep_report(sweep_id)))
                return
            if fmt not in ("json", "csv", "svg", "png"):
                raise _fail(f"--format must be table, json, csv, svg or png, not {fmt!r}", 2)
            body = client.sweep_report(sweep_id, format=fmt)
            data = json.dumps(body, indent=1) if fmt == "json" else body
            if output is not None:
                mode = "wb" if isinstance(data, bytes) else "w"
                with open(output, mode) as fh:
                    fh.write(data)
                console.print(f"wrote {output}")
            elif isinstance(data, bytes):
                sys.stdout.buffer.write(data)
            else:
                sys.stdout.write(data)
            return
        assert body is not None  # read above, before the server was asked
        created = client.submit_sweep(body, idempotency_key=idempotency_key)
        if not wait:
            print(created["id"])
            return
        console.print(f"submitted sweep {created['id']} ({created['runs']} runs)")
        done = _watch_sweep(client, created)
        console.print(_sweep_table(client.sweep_report(done["id"])))
    style = {"succeeded": "green", "failed": "red"}.get(done["status"], "yellow")
    console.print(f"sweep {done['id']} [{style}]{done['status']}[/{style}]")
    if done["status"] != "succeeded":
        raise typer.Exit(1)


@app.command()
def delete(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete a job with its metrics, logs, checkpoints and files (a running job is stopped)."""
    client, creds = _client(url, token)
    with _api_errors(creds):
        client.delete(job_id)
    console.print(f"job {job_id}: deleted")


# `pip install normcore` is the library; a command needing an extra's package names the extra
_EXTRA_OF_MODULE = {"httpx": "client", "sklearn": "data", "PIL": "data", "onnx": "onnx"}
_OURS = ("normcore", "service", "worker")


def main() -> None:
    """Console-script entry point; a command whose extra is not installed says which one to add."""
    try:
        app()
    except ImportError as exc:
        top = (getattr(exc, "name", None) or "").partition(".")[0]
        if "normcore[" in str(exc):  # normcore's own message already names the extra
            message = str(exc)
        elif isinstance(exc, ModuleNotFoundError) and top not in ("", *_OURS):
            extra = _EXTRA_OF_MODULE.get(top, "service")
            message = f"this command needs {top}: pip install 'normcore[{extra}]'"
        else:
            raise
        err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
