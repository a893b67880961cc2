"""Data-parallel training over ``resources.gpus = k > 1`` processes on one node.

``normcore.train`` calls :func:`run_distributed` when ``k > 1``. The calling process trains
nothing itself: it spawns ``k`` rank processes (``spawn`` context; NCCL on ``cuda:0..k-1``, gloo
on CPU, where ``gpus`` counts processes) and stays their supervisor and relay:

- The callbacks stay in the calling process. They are the caller's objects (the worker's hold a
  database connection), so they never cross a process boundary. Rank 0 sends what they need as
  JSON over a pipe (metric rows, log lines with their level, checkpoint infos, the setup info and
  the result) and the caller replays each message on its callbacks in order. Other ranks send
  only an error or nothing; JSON is all that crosses, never a pickle of user data.
- Cancel: the caller polls ``should_stop()`` once per relayed train row (once per step, as in a
  single process) and sets a shared event; rank 0 reads it after each step and broadcasts it, so
  every rank stops after the same step (a cancel lands a step or two after the poll).
- Failure: a rank that raises sends its error (type, message, traceback) and exits; the caller
  kills the other ranks and raises the same exception type (``TrainingDiverged``, ``ValueError``,
  ...) with the rank's traceback as its cause. Errors that only say a peer went away are passed
  over in favour of the root cause. A rank killed without a word fails the run with its signal.
- Rendezvous: the caller hosts the ``TCPStore`` on a port the OS picks on 127.0.0.1 (no race for
  a "free" port), and the ranks connect to it.

Each rank builds the same model from the same seed, converts BatchNorm to normcore's
``SyncBatchNorm`` when the norm is ``sync_bn`` or ``resources.sync_bn`` is set, and wraps it in
``DistributedDataParallel``. Rank ``r`` trains on its slice of each global batch of
``k * batch_size`` samples (``DataBundle.train_batches(..., rank=r, world_size=k)``), so the
run sees the batches a single process with ``k * batch_size`` would see; DDP averages the
gradients, which is the gradient of the global-batch mean loss. Train and val metrics are
all-reduced; only rank 0 writes checkpoints (the unwrapped model's state dict, so it loads into
the plain model). Resume: the caller resolves the checkpoint and every rank loads it.

Known limits: dropout masks come from the same RNG stream on every rank (correlated across
ranks; it keeps resume exact with one saved RNG state), and without ``sync_bn`` each rank keeps
BatchNorm statistics of its own slice and DDP broadcasts rank 0's before each forward.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import importlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from normcore.checkpoint import CheckpointInfo, latest_valid_checkpoint
from normcore.engine.callbacks import CallbackList, MetricRow, TrainingDiverged, TrainResult
from normcore.procs import ExitCode, signal_name, watch_parent
from normcore.spec import JobSpec

__all__ = ["DistContext", "DistributedTrainingError", "run_distributed"]

HOST = "127.0.0.1"
# How long the caller keeps reading after the first failure, so a root cause that is still on
# its way wins over the "peer went away" errors it causes in the other ranks.
ERROR_GRACE_S = 3.0
# Exit code of a rank whose supervising process disappeared.
ORPHAN_EXIT_CODE = ExitCode.ORPHAN
_RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=5)


class DistributedTrainingError(RuntimeError):
    """A rank failed with an error that cannot be re-raised as its own type (or died silently)."""


class _RemoteTraceback(Exception):
    """Carries a rank's formatted traceback as the ``__cause__`` of the re-raised error."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


# ============================================================================ inside a rank


@dataclass
class DistContext:
    """What the training loop of one rank needs to know about the process group."""

    rank: int
    world_size: int
    device: torch.device
    control_group: Any  # a gloo group for CPU flags (the world group when it is gloo already)

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one that reports and writes checkpoints."""
        return self.rank == 0

    def sync_norm(self, spec: JobSpec, model: nn.Module) -> nn.Module:
        """Convert BatchNorm layers to normcore's SyncBatchNorm when the spec asks for it."""
        if wants_sync_bn(spec):
            from normcore.convert import convert_sync_norm

            return convert_sync_norm(model)
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel (its parameters broadcast from rank 0)."""
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":
            return DistributedDataParallel(
                model, device_ids=[self.device.index], output_device=self.device.index
            )
        return DistributedDataParallel(model)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over all ranks (a copy; the argument is left unchanged)."""
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        """Mean of ``tensor`` over all ranks (a copy)."""
        return self.all_reduce_sum(tensor) / self.world_size

    def agree_stop(self, stop: bool) -> bool:
        """Rank 0's stop decision, on every rank (a broadcast on the CPU control group)."""
        flag = torch.tensor([1 if stop else 0], dtype=torch.int32)
        dist.broadcast(flag, src=0, group=self.control_group)
        return bool(flag.item())


def wants_sync_bn(spec: JobSpec) -> bool:
    """True when BatchNorm statistics should span all ranks: norm ``sync_bn`` or resources.sync_bn."""
    from normcore.factory import parse_norm

    entry = parse_norm(spec.model.norm).entry
    return spec.resources.sync_bn or (entry is not None and entry.name == "sync_bn")


class _Relay(CallbackList):
    """Rank 0's callbacks: each hook becomes one JSON message to the calling process."""

    def __init__(self, conn: multiprocessing.connection.Connection, stop: Any) -> None:
        super().__init__([])
        self.conn = conn
        self.stop = stop

    def send(self, kind: str, **payload: Any) -> None:
        """Send one message (blocks while the caller is behind: backpressure, not loss)."""
        self.conn.send_bytes(json.dumps({"kind": kind, **payload}).encode("utf-8"))

    def train_start(self, info: dict[str, Any]) -> None:
        self.send("train_start", info=info)

    def metrics(self, row: MetricRow) -> None:
        self.send("metrics", row=row.to_dict())

    def checkpoint(self, ckpt: CheckpointInfo) -> None:
        self.send("checkpoint", info=ckpt.to_dict())

    def log(self, message: str, level: int = logging.INFO) -> None:
        self.send("log", message=message, level=int(level))

    def should_stop(self) -> bool:
        return self.stop.is_set()

    def train_end(self, result: TrainResult) -> None:  # the caller calls its own train_end
        pass


def _loopback_interface() -> str | None:
    """The name of the loopback interface ("lo" on Linux, "lo0" on macOS), if one is found."""
    with contextlib.suppress(OSError):
        for _, name in socket.if_nameindex():
            if name in ("lo", "lo0"):
                return name
    return None


# How a peer going away reads in the other ranks (gloo raises plain RuntimeErrors).
_PEER_GONE = (
    "connection reset by peer",
    "connection closed by peer",
    "broken pipe",
    "gloo/transport",
    "nccl communicator was aborted",
)


def _is_peer_error(exc: BaseException) -> bool:
    """True for a collective that failed because another rank died: a symptom, not the cause."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _PEER_GONE)


def _error_payload(exc: BaseException, rank: int) -> dict[str, Any]:
    """A JSON description of ``exc`` from which the caller rebuilds an exception of its type."""
    payload: dict[str, Any] = {
        "kind": "error",
        "rank": rank,
        "type": type(exc).__name__,
        "module": type(exc).__module__,
        "message": str(exc)[:20_000],
        "traceback": "".join(traceback.format_exception(exc))[-20_000:],
        "secondary": _is_peer_error(exc),
    }
    if isinstance(exc, TrainingDiverged):
        payload["diverged"] = {"step": exc.step, "epoch": exc.epoch, "value": repr(exc.value)}
    if isinstance(exc, OSError) and exc.errno is not None:
        payload["os"] = {"errno": exc.errno, "strerror": exc.strerror, "filename": exc.filename}
    return payload


def _rank_main(
    config_json: str, rank: int, conn: multiprocessing.connection.Connection, stop: Any
) -> None:
    """Entry point of one rank: join the process group, train, report, exit."""
    cfg = json.loads(config_json)
    watch_parent(cfg["parent_pid"], f"rank {rank}")
    # Lines reach the caller through the relay; nothing is printed or handled here.
    engine_log = logging.getLogger("normcore")
    engine_log.addHandler(logging.NullHandler())
    engine_log.propagate = False
    torch.set_num_threads(int(cfg["threads"]))
    code = 0
    try:
        _train_rank(cfg, rank, conn, stop)
    except BaseException as exc:
        code = 1
        with contextlib.suppress(Exception):
            conn.send_bytes(json.dumps(_error_payload(exc, rank)).encode("utf-8"))
    with contextlib.suppress(Exception):
        conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (and a process-group shutdown that could wait on a dead peer).
    os._exit(code)


def _train_rank(
    cfg: dict[str, Any], rank: int, conn: multiprocessing.connection.Connection, stop: Any
) -> None:
    """Set up the process group and device of this rank and run the training loop."""
    from normcore.engine.loop import _run
    from normcore.engine.precision import determinism
    from normcore.spec import load_spec

    started = time.perf_counter()
    world_size = int(cfg["world_size"])
    device = torch.device(cfg["devices"][rank])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    iface = _loopback_interface()
    if iface is not None:  # one node: gloo talks over loopback whatever the hostname resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
    store = dist.TCPStore(
        HOST, int(cfg["port"]), is_master=False, timeout=_RENDEZVOUS_TIMEOUT, use_libuv=True
    )
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    ctx = DistContext(rank, world_size, device, control)
    cbs: CallbackList = _Relay(conn, stop) if rank == 0 else CallbackList([])
    spec = load_spec(cfg["spec"])
    resume = cfg["resume"]
    with determinism(device) as deterministic:
        result = _run(
            spec,
            Path(cfg["workdir"]),
            cbs,
            Path(resume) if resume else None,
            cfg["data_root"],
            device,
            deterministic,
            started,
            ddp=ctx,
        )
    if rank == 0:
        assert isinstance(cbs, _Relay)
        cbs.send(
            "result",
            status=result.status,
            epochs_completed=result.epochs_completed,
            global_step=result.global_step,
            metrics=result.metrics,
            checkpoints=[str(c.path) for c in result.checkpoints],
            resumed_from=str(result.resumed_from) if result.resumed_from else None,
        )
    dist.destroy_process_group()


# ============================================================================ the calling process


def _devices(device: torch.device, world_size: int) -> list[str]:
    """One device per rank: ``cuda:i..i+k-1`` from the requested index, or ``cpu`` each."""
    if device.type != "cuda":
        return ["cpu"] * world_size
    base = device.index or 0
    count = torch.cuda.device_count()
    if base + world_size > count:
        raise ValueError(
            f"resources.gpus={world_size} but this machine has {count} CUDA device(s)"
            + (f" from cuda:{base} on" if base else "")
            + ": lower resources.gpus, or use device 'cpu' for gloo processes"
        )
    return [f"cuda:{base + r}" for r in range(world_size)]


def _rebuild_error(payload: dict[str, Any]) -> BaseException:
    """The exception a rank reported, as its own type where that is safe to rebuild."""
    name, module = str(payload.get("type")), str(payload.get("module"))
    message = str(payload.get("message", ""))
    rank = payload.get("rank")
    exc: BaseException | None = None
    if "diverged" in payload:
        d = payload["diverged"]
        exc = TrainingDiverged(int(d["step"]), int(d["epoch"]), float(d["value"]))
    elif module == "builtins" or module.split(".")[0] in ("torch", "normcore"):
        with contextlib.suppress(Exception):
            source = builtins if module == "builtins" else importlib.import_module(module)
            cls = getattr(source, name)
            if isinstance(cls, type) and issubclass(cls, Exception):
                os_args = payload.get("os")
                if os_args and issubclass(cls, OSError):
                    exc = cls(os_args["errno"], os_args["strerror"], os_args["filename"])
                else:
                    exc = cls(message)
    if exc is None:
        exc = DistributedTrainingError(f"rank {rank}: {name}: {message}")
    exc.__cause__ = _RemoteTraceback(f"\nrank {rank} traceback:\n{payload.get('traceback', '')}")
    return exc


def _exit_error(rank: int, exitcode: int | None) -> DistributedTrainingError:
    """The error for a rank that ended without reporting one."""
    if exitcode is not None and exitcode < 0:
        return DistributedTrainingError(f"rank {rank} was killed by {signal_name(-exitcode)}")
    if exitcode == ORPHAN_EXIT_CODE:
        return DistributedTrainingError(f"rank {rank} lost its supervisor and exited")
    return DistributedTrainingError(f"rank {rank} exited with code {exitcode} and no result")


class _Supervisor:
    """Replays rank 0's messages on the caller's callbacks and watches every rank."""

    def __init__(self, cbs: CallbackList, stop: Any) -> None:
        self.cbs = cbs
        self.stop = stop
        self.result: dict[str, Any] | None = None
        self.checkpoints: list[CheckpointInfo] = []
        self.errors: list[dict[str, Any]] = []
        self.exits: dict[int, int] = {}  # rank -> exit code, in the order the exits were seen

    def handle(self, message: dict[str, Any]) -> None:
        """Act on one message from a rank."""
        kind = message.get("kind")
        if kind == "metrics":
            row = MetricRow(**message["row"])
            self.cbs.metrics(row)
            if row.split == "train" and self.cbs.should_stop():
                self.stop.set()
        elif kind == "log":
            self.cbs.log(str(message["message"]), int(message.get("level", logging.INFO)))
        elif kind == "checkpoint":
            info = dict(message["info"])
            ckpt = CheckpointInfo(**{**info, "path": Path(info["path"])})
            self.checkpoints.append(ckpt)
            self.cbs.checkpoint(ckpt)
        elif kind == "train_start":
            self.cbs.train_start(dict(message["info"]))
        elif kind == "result":
            self.result = message
        elif kind == "error":
            self.errors.append(message)

    def failure(self) -> BaseException | None:
        """The exception that ended the run, or None when rank 0 reported a result.

        In order of preference: the first error a rank raised itself; a rank that died without
        a word (killed, crashed); an error that only says a peer went away.
        """
        primary = [e for e in self.errors if not e.get("secondary")]
        if primary:
            return _rebuild_error(primary[0])
        reported = {e.get("rank") for e in self.errors}
        silent = [(r, c) for r, c in self.exits.items() if c != 0 and r not in reported]
        if silent:
            return _exit_error(*silent[0])
        if self.errors:
            return _rebuild_error(self.errors[0])
        if self.result is None:
            rank, code = next(((r, c) for r, c in self.exits.items() if c != 0), (0, None))
            return _exit_error(rank, code)
        return None


_MISSING = object()


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """Start spawned ranks without re-importing the caller's ``__main__``.

    A rank needs nothing from it (its target lives here and its arguments are JSON), and a
    script that calls ``train`` at top level without ``if __name__ == "__main__"`` would
    otherwise run again in every rank. ``multiprocessing`` decides this from ``__main__``'s
    ``__spec__`` and ``__file__`` when a process starts, as it does for interactive sessions.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {name: getattr(main, name, _MISSING) for name in ("__spec__", "__file__")}
    main.__spec__ = None
    if saved["__file__"] is not _MISSING:
        del main.__file__
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is not _MISSING:
                setattr(main, name, value)


def _stop_ranks(procs: list[Any]) -> None:
    """SIGKILL every rank still running and reap them all."""
    for proc in procs:
        if proc.is_alive():
            with contextlib.suppress(Exception):
                proc.kill()
    for proc in procs:
        proc.join(10)


def run_distributed(
    spec: JobSpec,
    workdir: Path,
    cbs: CallbackList,
    resume: str | Path | None,
    data_root: str | Path | None,
    device: torch.device,
    started: float,
) -> TrainResult:
    """Train ``spec`` data-parallel over ``spec.resources.gpus`` spawned ranks; see the module doc."""
    world_size = spec.resources.gpus
    devices = _devices(device, world_size)
    if resume is not None and str(resume) == "latest":
        found = latest_valid_checkpoint(workdir, log=cbs.log)
        if found is None:
            cbs.log(f"no valid checkpoint in {workdir.name}: starting from scratch")
        resume = found
    store = dist.TCPStore(
        HOST, 0, is_master=True, wait_for_workers=False, timeout=_RENDEZVOUS_TIMEOUT
    )
    config = {
        "spec": spec.model_dump(mode="json"),
        "workdir": str(workdir),
        "resume": str(resume) if resume is not None else None,
        "data_root": str(data_root) if data_root is not None else None,
        "devices": devices,
        "world_size": world_size,
        "port": store.port,
        "threads": max(1, torch.get_num_threads() // world_size),
        "parent_pid": os.getpid(),
    }
    mp = multiprocessing.get_context("spawn")
    stop = mp.Event()
    sup = _Supervisor(cbs, stop)
    procs: list[Any] = []
    readers: dict[Any, int] = {}
    try:
        for rank in range(world_size):
            recv, send = mp.Pipe(duplex=False)
            proc = mp.Process(
                target=_rank_main,
                args=(json.dumps(config), rank, send, stop),
                name=f"normcore-rank{rank}",
                daemon=True,
            )
            with _main_not_reimported():
                proc.start()
            send.close()  # the rank holds the only write end: its exit reads as EOF
            procs.append(proc)
            readers[recv] = rank
        _supervise(sup, procs, readers)
    finally:
        _stop_ranks(procs)
        for conn in readers:
            conn.close()
        del store

    failure = sup.failure()
    if failure is not None:
        raise failure
    res = sup.result
    kept = set(res["checkpoints"])
    metrics = {k: float(v) for k, v in res["metrics"].items()}
    return TrainResult(
        status=res["status"] if res["status"] in ("cancelled", "timed_out") else "succeeded",
        epochs_completed=int(res["epochs_completed"]),
        global_step=int(res["global_step"]),
        metrics=metrics,
        checkpoints=[c for c in sup.checkpoints if str(c.path) in kept],
        workdir=workdir,
        duration_s=time.perf_counter() - started,
        resumed_from=Path(res["resumed_from"]) if res["resumed_from"] else None,
    )


def _supervise(sup: _Supervisor, procs: list[Any], readers: dict[Any, int]) -> None:
    """Read every rank's pipe until all ranks are done; after a failure, stop waiting soon."""
    open_readers = dict(readers)
    failed_at: float | None = None
    while True:
        for rank, proc in enumerate(procs):
            if rank not in sup.exits and proc.exitcode is not None:
                sup.exits[rank] = proc.exitcode  # in the order they are seen, before any kill
        if not open_readers and len(sup.exits) == len(procs):
            return
        if failed_at is None and (sup.errors or any(c != 0 for c in sup.exits.values())):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > ERROR_GRACE_S:
            return  # run_distributed kills the ranks still running
        waitables = [*open_readers, *(p.sentinel for p in procs if p.exitcode is None)]
        for ready in multiprocessing.connection.wait(waitables, timeout=0.5):
            if ready not in open_readers:
                continue  # a sentinel: the exit is recorded at the top of the loop
            try:
                raw = ready.recv_bytes()
            except (EOFError, OSError):
                del open_readers[ready]
                continue
            sup.handle(json.loads(raw.decode("utf-8")))
