"""The ``normcore.run_artifact`` task: build an export or a recalibration in a child process.

The API never runs torch on user data: it records an ``artifacts`` row and publishes its id
(``service.queue.enqueue_artifact``). A worker claims the row (``Store.claim_artifact``: queued,
or running with an expired lease, so a killed worker's artifact is taken again by the next
request's message), and the work runs in a child forked from the warm fork server
(``worker/warm.py``: torch imported, CUDA never initialized), as training does, so the Celery
process stays free of torch. The child gets only JSON (paths, options) and sends back JSON over
a pipe; this process renews the lease by heartbeat, kills the child past
``ARTIFACT_TIMEOUT_S`` and writes the outcome (and, for a recalibration, the new checkpoint's
record) to the store.

Why a task of its own and not a job kind: a job is a training run with a spec, attempts,
metric rows, fair scheduling and quotas; an export is a minute of CPU on a finished
checkpoint whose result is cached by (checkpoint sha256, options), polled by the API and never
resumed. Sharing the job table would put exports in every job list, quota and scheduler.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import time
import traceback
from pathlib import Path
from typing import Any

from normcore.procs import signal_group
from service.settings import Settings
from service.store import NotFound, Store
from service.store.exports import ArtifactKind, ArtifactStatus
from worker import warm
from worker.runner import MAX_ERROR_CHARS, ShutdownFlags, worker_id
from worker.threads import choose_train_threads

log = logging.getLogger("worker.artifacts")

ARTIFACT_TIMEOUT_S = 600.0  # an export or recalibration past this is killed and failed
EXPORTS_FOLDER = "exports"
# Prefix of a failure that says nothing about the checkpoint (killed, out of time): the next
# request for the artifact tries again (service/artifacts.py), unlike a deterministic failure.
INTERRUPTED = "interrupted: "
# Prefix of a failure of this worker's installation (a missing package): also tried again by
# the next request, once the package is installed.
ENVIRONMENT = "worker environment: "


def export_path(settings: Settings, job_id: str, artifact_id: str) -> Path:
    """Where the ONNX file of an export artifact is written: in the job's folder (deleted with
    the job), ``exports/<artifact id>.onnx``."""
    return settings.job_dir(job_id) / EXPORTS_FOLDER / f"{artifact_id}.onnx"


def _child_main(config_json: str, conn: multiprocessing.connection.Connection) -> None:
    """Entry point of the artifact child: build, send a JSON outcome, exit."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = json.loads(config_json)
    code = 0
    try:
        import torch

        if cfg.get("threads"):
            torch.set_num_threads(int(cfg["threads"]))
        from worker import builds

        if cfg["kind"] == ArtifactKind.EXPORT:
            result = builds.export_checkpoint(
                cfg["folder"],
                cfg["out_path"],
                fold_bn=bool(cfg["options"].get("fold_bn", True)),
                data_root=cfg["data_root"],
                include_preprocessing=bool(cfg["options"].get("preprocessing", False)),
            )
        else:
            result = builds.recalibrate_checkpoint(
                cfg["folder"], batches=int(cfg["options"]["batches"]), data_root=cfg["data_root"]
            )
        outcome: dict[str, Any] = {"status": "succeeded", "result": result}
    except BaseException as exc:
        code = 1
        text = str(exc) or type(exc).__name__
        error = text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"
        if isinstance(exc, ImportError):
            error = f"{ENVIRONMENT}{error}; {_install_hint(cfg['kind'])}"
        outcome = {
            "status": "failed",
            "error": error[:MAX_ERROR_CHARS],
            "traceback": "".join(traceback.format_exception(exc))[-MAX_ERROR_CHARS:],
        }
    with contextlib.suppress(OSError):
        conn.send_bytes(json.dumps(outcome).encode("utf-8"))
    os._exit(code)


def _install_hint(kind: str) -> str:
    """What to install on the worker when a build of ``kind`` lacks a package."""
    if kind == ArtifactKind.EXPORT:
        return "install normcore[onnx] on the worker (scripts/serve.sh and the worker image do)"
    return "install normcore[service] on the worker"


def _start_child(config: dict[str, Any], send_end: Any) -> Any:
    """The child, forked from the warm fork server (spawned when that cannot start)."""
    try:
        ctx: Any = warm.context()
        proc = ctx.Process(target=_child_main, args=(json.dumps(config), send_end), daemon=False)
        proc.start()
        return proc
    except OSError as exc:
        log.warning("warm fork server unavailable (%r): spawning the artifact process", exc)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_child_main, args=(json.dumps(config), send_end), daemon=False)
    proc.start()
    return proc


def _checkpoint_folder(settings: Settings, job_id: str, path: str) -> Path:
    """The recorded checkpoint folder, confined to the job's own folder (ValueError if not)."""
    root = settings.job_dir(job_id).resolve()
    recorded = Path(path)
    folder = recorded if recorded.is_absolute() else settings.artifact_dir / recorded
    folder = folder.resolve()
    if folder.name == "model.safetensors":
        folder = folder.parent
    if not folder.is_relative_to(root):
        raise ValueError("the checkpoint's recorded path lies outside its job's folder")
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {folder.name} is gone (pruned by keep_last?)")
    return folder


def run_artifact(
    artifact_id: str,
    settings: Settings,
    store: Store,
    *,
    flags: ShutdownFlags | None = None,
    api_beside: bool = False,
) -> str:
    """Claim an artifact and build it; returns "duplicate", "succeeded", "failed", "lost"
    (another worker took it over) or "shutdown" (the worker is stopping: left for a retry).
    ``api_beside``: the API runs on this host, so the child's thread count keeps a core for it
    (as a training child's does)."""
    flags = flags or ShutdownFlags.new()
    me = worker_id()
    art = store.claim_artifact(artifact_id, worker_id=me, lease_seconds=settings.lease_seconds)
    if art is None:
        log.info("artifact %s: not claimable (done, held elsewhere or gone)", artifact_id)
        return "duplicate"
    log.info("artifact %s: %s of %s/%s claimed", art.id, art.kind, art.job_id, art.checkpoint)
    record = store.get_checkpoint(art.job_id, art.checkpoint)
    if record is None or record.sha256 != art.checkpoint_sha256:
        return _finish_failed(
            store, art.id, me, f"checkpoint {art.checkpoint!r} is gone or was replaced"
        )
    try:
        folder = _checkpoint_folder(settings, art.job_id, record.path)
    except ValueError as exc:
        return _finish_failed(store, art.id, me, str(exc))
    out_path = export_path(settings, art.job_id, art.id)
    threads = choose_train_threads(
        settings.train_threads, concurrency=settings.worker_concurrency, api_beside=api_beside
    )
    config = {
        "kind": art.kind,
        "folder": str(folder),
        "out_path": str(out_path),
        "options": art.options,
        "data_root": str(settings.data_root),
        "threads": threads.threads,
    }
    recv_end, send_end = multiprocessing.Pipe(duplex=False)
    proc: Any = None
    outcome: dict[str, Any] | None = None
    try:
        proc = _start_child(config, send_end)
        send_end.close()
        outcome = _supervise(proc, recv_end, store, art.id, me, settings, flags)
    finally:
        if proc is not None and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.join(5)
        recv_end.close()
        send_end.close()
    if outcome is None:
        return "shutdown" if flags.warm.is_set() or flags.cold.is_set() else "lost"
    if outcome.get("status") != "succeeded":
        log.warning("artifact %s failed:\n%s", art.id, outcome.get("traceback", ""))
        return _finish_failed(store, art.id, me, str(outcome.get("error") or "failed"))
    result = outcome["result"]
    if art.kind == ArtifactKind.EXPORT:
        written = store.finish_artifact(
            art.id,
            worker_id=me,
            status=ArtifactStatus.SUCCEEDED,
            result=result,
            path=out_path.resolve().relative_to(settings.artifact_dir.resolve()).as_posix(),
            sha256=_sha256_file(out_path),
            bytes=out_path.stat().st_size,
        )
    else:
        rel = Path(result["path"]).resolve().relative_to(settings.artifact_dir.resolve()).as_posix()
        try:
            store.add_derived_checkpoint(
                art.job_id,
                name=result["name"],
                epoch=result["epoch"],
                step=result["step"],
                bytes=result["bytes"],
                sha256=result["sha256"],
                files=result["files"],
                metrics=result["metrics"],
                path=rel,
            )
        except NotFound:  # the job was deleted meanwhile
            _remove_if_deleted(store, settings, art.job_id)
            return "lost"
        result = {k: v for k, v in result.items() if k not in ("path", "files")}
        written = store.finish_artifact(
            art.id, worker_id=me, status=ArtifactStatus.SUCCEEDED, result=result, path=rel
        )
    log.info("artifact %s: succeeded%s", art.id, "" if written else " (lease lost; not recorded)")
    if not written:
        _remove_if_deleted(store, settings, art.job_id)
    return "succeeded" if written else "lost"


def _remove_if_deleted(store: Store, settings: Settings, job_id: str) -> None:
    """Remove the folder of a job deleted while its artifact was built: the API removed it at
    once, but the child may have written (and so re-created) it since."""
    with contextlib.suppress(Exception):
        if store.get_job(job_id) is None:
            shutil.rmtree(settings.job_dir(job_id), ignore_errors=True)


def _supervise(
    proc: Any,
    recv_end: Any,
    store: Store,
    artifact_id: str,
    me: str,
    settings: Settings,
    flags: ShutdownFlags,
) -> dict[str, Any] | None:
    """Renew the lease until the child sends its outcome or exits; None when it was stopped
    (shutdown, lease lost) or died without a word, or a failure outcome past the timeout."""
    deadline = time.monotonic() + ARTIFACT_TIMEOUT_S
    while True:
        ready = multiprocessing.connection.wait(
            [recv_end, proc.sentinel], timeout=settings.heartbeat_seconds
        )
        if recv_end in ready:
            with contextlib.suppress(EOFError, OSError, ValueError):
                outcome = json.loads(recv_end.recv_bytes().decode("utf-8"))
                return outcome if isinstance(outcome, dict) else None
            return None
        if proc.sentinel in ready:
            return {
                "status": "failed",
                "error": f"{INTERRUPTED}the artifact process died (exit {proc.exitcode})",
            }
        if flags.warm.is_set() or flags.cold.is_set():
            signal_group(proc.pid, signal.SIGKILL)
            return None
        if time.monotonic() > deadline:
            signal_group(proc.pid, signal.SIGKILL)
            return {
                "status": "failed",
                "error": f"{INTERRUPTED}took longer than {ARTIFACT_TIMEOUT_S:g} s",
            }
        try:
            held = store.renew_artifact(
                artifact_id, worker_id=me, lease_seconds=settings.lease_seconds
            )
        except Exception as exc:  # a store outage: keep working, the lease may still hold
            log.warning("artifact %s: lease renewal failed: %r", artifact_id, exc)
            continue
        if not held:
            signal_group(proc.pid, signal.SIGKILL)
            return None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _finish_failed(store: Store, artifact_id: str, me: str, error: str) -> str:
    store.finish_artifact(artifact_id, worker_id=me, status=ArtifactStatus.FAILED, error=error)
    log.warning("artifact %s failed: %s", artifact_id, error)
    return "failed"
