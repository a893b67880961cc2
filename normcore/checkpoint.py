"""Checkpoints as folders of safetensors and JSON files: no pickle is written or read.

A checkpoint is ``<checkpoints>/epoch-0003/`` holding

- ``model.safetensors``: the whole model state dict (running statistics included);
- ``optimizer.safetensors`` + ``optimizer.json``: optimizer state tensors as ``state.<i>.<key>``,
  and the param groups plus non-tensor state as JSON;
- ``rng.safetensors`` + ``state.json``: torch RNG states as uint8 tensors; epoch, step, the
  python and numpy RNG states and anything else the engine needs to resume, as JSON;
- ``meta.json``: the spec, epoch, step, metrics, library versions and the sha256 and size of
  every other file, so a reader can verify the folder before trusting it.

It is written to ``.epoch-0003.tmp-<pid>``, each file fsynced, then renamed into place and the
parent directory fsynced, so a crash leaves either the old state or the complete new folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save
from torch import Tensor, nn

__all__ = [
    "Checkpoint",
    "CheckpointInfo",
    "checkpoint_name",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "read_meta",
    "save_checkpoint",
    "verify_checkpoint",
]

FORMAT = "normcore-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
META_FILE = "meta.json"
HEADER_KEY = "normcore"  # key of the JSON document in model.safetensors' own metadata

_NAME_RE = re.compile(r"^epoch-(\d+)$")
_TMP_RE = re.compile(r"^\.epoch-\d+\.(?:tmp|old)-(\d+)$")


@dataclass(frozen=True)
class CheckpointInfo:
    """A written checkpoint: ``bytes`` and ``sha256`` describe its ``model.safetensors``."""

    name: str
    path: Path
    epoch: int
    step: int
    bytes: int
    sha256: str
    files: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``path`` as a string)."""
        return {
            "name": self.name,
            "path": str(self.path),
            "epoch": self.epoch,
            "step": self.step,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "files": dict(self.files),
            "metrics": dict(self.metrics),
        }


@dataclass
class Checkpoint:
    """A verified checkpoint read back into memory (tensors on CPU)."""

    path: Path
    meta: dict[str, Any]
    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None
    rng_tensors: dict[str, Tensor]
    state: dict[str, Any]

    @property
    def epoch(self) -> int:
        """Epochs completed when the checkpoint was written."""
        return int(self.meta["epoch"])

    @property
    def step(self) -> int:
        """Optimizer updates done when the checkpoint was written."""
        return int(self.meta["step"])


def checkpoint_name(epoch: int) -> str:
    """Folder name of the checkpoint written after ``epoch`` epochs: ``epoch-0003``."""
    return f"epoch-{epoch:04d}"


# ----------------------------------------------------------------------------- writing


def _cpu_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing storage are copied (safetensors refuses them)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen:
            t = t.clone()
        elif ptr != -1:
            seen.add(ptr)
        out[key] = t
    return out


def _flatten_optimizer(state_dict: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (``state.<i>.<key>``) and a JSON part."""
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    return _cpu_tensors(tensors), {"param_groups": state_dict["param_groups"], "state": plain}


def _unflatten_optimizer(tensors: Mapping[str, Tensor], plain: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``_flatten_optimizer``: a state dict ``Optimizer.load_state_dict`` accepts."""
    state: dict[int, dict[str, Any]] = {}
    for index, entry in plain.get("state", {}).items():
        state.setdefault(int(index), {}).update(entry)
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _write_file(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` and fsync it; return its sha256."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    # Directories cannot be opened for fsync on every platform (Windows); best effort there.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_temporaries(root: Path) -> None:
    """Remove half-written folders left by processes that died while writing."""
    for child in root.iterdir():
        m = _TMP_RE.match(child.name)
        if m and child.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(child, ignore_errors=True)


def _versions() -> dict[str, str]:
    import normcore

    return {
        "normcore": normcore.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def save_checkpoint(
    directory: str | Path,
    *,
    epoch: int,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    spec: Any = None,
    metrics: Mapping[str, float] | None = None,
    rng_tensors: Mapping[str, Tensor] | None = None,
    state: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
) -> CheckpointInfo:
    """Write checkpoint ``epoch-<epoch>`` atomically under ``directory`` and prune old ones.

    ``spec`` is a JobSpec (stored as its JSON dump); ``state`` is JSON-ready training state
    (RNG states, scaler) stored in state.json beside epoch and step; ``meta`` adds fields to
    meta.json (the engine stores in_channels, num_classes, task and data normalization).
    ``keep_last`` keeps that many of the newest checkpoints with an epoch up to this one, and
    drops those with a later epoch (left by an earlier attempt that this run has replaced).
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    name = checkpoint_name(epoch)
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    spec_doc = spec.model_dump(mode="json") if hasattr(spec, "model_dump") else spec
    metrics_dict = {k: float(v) for k, v in (metrics or {}).items()}
    header = _model_header(spec_doc, meta or {}, epoch=epoch, step=step, metrics=metrics_dict)
    payloads: dict[str, bytes] = {
        MODEL_FILE: st_save(_cpu_tensors(model.state_dict()), metadata=header)
    }
    if optimizer is not None:
        opt_tensors, opt_json = _flatten_optimizer(optimizer.state_dict())
        payloads[OPTIMIZER_TENSORS] = st_save(opt_tensors)
        payloads[OPTIMIZER_JSON] = _json_bytes(opt_json)
    payloads[RNG_FILE] = st_save(_cpu_tensors(dict(rng_tensors or {})))
    payloads[STATE_FILE] = _json_bytes({**dict(state or {}), "epoch": epoch, "step": step})

    meta_doc = {
        **dict(meta or {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "epoch": epoch,
        "step": step,
        "spec": spec_doc,
        "metrics": metrics_dict,
        "versions": _versions(),
    }
    files: dict[str, dict[str, Any]] = {}
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for filename, data in payloads.items():
            files[filename] = {"sha256": _write_file(tmp / filename, data), "bytes": len(data)}
        _write_file(tmp / META_FILE, _json_bytes({**meta_doc, "files": files}))
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if final.exists():  # a corrupt or abandoned folder of the same epoch: swap it out
        old = root / f".{name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)

    if keep_last is not None:
        _prune(root, epoch, keep_last)
    return CheckpointInfo(
        name=name,
        path=final,
        epoch=epoch,
        step=step,
        bytes=files[MODEL_FILE]["bytes"],
        sha256=files[MODEL_FILE]["sha256"],
        files={k: v["sha256"] for k, v in files.items()},
        metrics=metrics_dict,
    )


def _model_header(
    spec_doc: Any, meta: Mapping[str, Any], *, epoch: int, step: int, metrics: Mapping[str, float]
) -> dict[str, str] | None:
    """What model.safetensors carries in its own header so the file alone rebuilds its model.

    The service serves only this file; with the model spec inside it, ``load_model(file)`` works
    on a download without meta.json, and ``normcore.inference.load_predictor(file)`` predicts
    on raw images: ``input`` (``InputSpec.to_dict``: channels, image size, per-channel mean
    and std, resizing) and ``classes`` (label names, or None) come from the engine's ``meta``,
    ``data`` is the data spec trained on. Headers without ``input`` (older files) still load.
    """
    if not isinstance(spec_doc, dict) or "model" not in spec_doc or "in_channels" not in meta:
        return None
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": spec_doc["model"],
        "in_channels": meta["in_channels"],
        "num_classes": meta.get("num_classes"),
        "task": meta.get("task"),
        "epoch": epoch,
        "step": step,
        "metrics": dict(metrics),
    }
    for key in ("input", "classes"):
        if meta.get(key) is not None:
            doc[key] = meta[key]
    if isinstance(spec_doc.get("data"), dict):
        doc["data"] = spec_doc["data"]
    return {HEADER_KEY: json.dumps(doc, sort_keys=True)}


def read_model_header(path: str | Path) -> dict[str, Any] | None:
    """The normcore header of a model.safetensors file, or None if it carries none."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(HEADER_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed normcore header ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "model" not in doc:
        raise ValueError(f"{path}: not a normcore model header")
    return doc


def _prune(root: Path, written_epoch: int, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints up to ``written_epoch``; drop later ones."""
    older = []
    for path in list_checkpoints(root):
        epoch = _epoch_of(path)
        if epoch > written_epoch:
            shutil.rmtree(path, ignore_errors=True)
        elif epoch < written_epoch:
            older.append(path)
    for path in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    _fsync_dir(root)


# ----------------------------------------------------------------------------- reading


def _epoch_of(path: Path) -> int:
    m = _NAME_RE.match(path.name)
    if m is None:
        raise ValueError(f"{path}: not a checkpoint folder name (expected epoch-NNNN)")
    return int(m.group(1))


def _checkpoints_root(workdir: str | Path) -> Path:
    workdir = Path(workdir)
    nested = workdir / "checkpoints"
    return nested if nested.is_dir() else workdir


def list_checkpoints(workdir: str | Path) -> list[Path]:
    """Checkpoint folders under ``workdir/checkpoints`` (or ``workdir`` itself), oldest first."""
    root = _checkpoints_root(workdir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME_RE.match(p.name)]
    return sorted(found, key=_epoch_of)


def _folder(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.is_file() else path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The parsed meta.json of a checkpoint folder; ValueError if missing or malformed."""
    meta_path = _folder(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{meta_path}: missing, not a complete checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{meta_path}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a normcore checkpoint meta.json")
    if not isinstance(meta.get("files"), dict) or MODEL_FILE not in meta["files"]:
        raise ValueError(f"{meta_path}: lists no {MODEL_FILE}")
    return meta


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_file(folder: Path, filename: str, record: Mapping[str, Any], read: bool) -> bytes | None:
    """Check one listed file's size and sha256; return its bytes when ``read``."""
    file = folder / filename
    if not file.is_file():
        raise ValueError(f"checkpoint {folder}: {filename} is missing")
    size = file.stat().st_size
    if size != record.get("bytes"):
        raise ValueError(
            f"checkpoint {folder}: {filename} has {size} bytes, meta.json says {record.get('bytes')}"
        )
    data = file.read_bytes() if read else None
    digest = hashlib.sha256(data).hexdigest() if data is not None else _sha256_file(file)
    if digest != record.get("sha256"):
        raise ValueError(f"checkpoint {folder}: {filename} fails its sha256 check (corrupt)")
    return data


def verify_checkpoint(path: str | Path) -> None:
    """Check every file listed in meta.json exists with its recorded size and sha256.

    Raises ValueError naming the first file that is missing or does not match.
    """
    folder = _folder(path)
    for filename, record in read_meta(folder)["files"].items():
        _check_file(folder, filename, record, read=False)


def latest_valid_checkpoint(
    workdir: str | Path, log: Callable[[str], None] | None = None
) -> Path | None:
    """The newest checkpoint that verifies; each newer one that fails is reported to ``log``."""
    for path in reversed(list_checkpoints(workdir)):
        try:
            verify_checkpoint(path)
        except ValueError as exc:
            if log is not None:
                log(f"skipping corrupt checkpoint {path.name}, falling back to an older one: {exc}")
            continue
        return path
    return None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder into memory (tensors on CPU), verifying every file as it is read."""
    folder = _folder(path)
    meta = read_meta(folder)
    data = {name: _check_file(folder, name, rec, read=True) for name, rec in meta["files"].items()}
    optimizer_state = None
    if OPTIMIZER_TENSORS in data and OPTIMIZER_JSON in data:
        optimizer_state = _unflatten_optimizer(
            st_load(data[OPTIMIZER_TENSORS]), json.loads(data[OPTIMIZER_JSON])
        )
    return Checkpoint(
        path=folder,
        meta=meta,
        model_state=st_load(data[MODEL_FILE]),
        optimizer_state=optimizer_state,
        rng_tensors=st_load(data[RNG_FILE]) if RNG_FILE in data else {},
        state=json.loads(data[STATE_FILE]) if STATE_FILE in data else {},
    )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a checkpoint was trained as, load its weights strictly, in eval mode."""
    from normcore.models import build_model
    from normcore.spec import ModelSpec

    path = Path(path)
    if path.is_file() and not (path.parent / META_FILE).is_file():
        # a lone downloaded model.safetensors: its header says what to build
        model_file = path
        header = read_model_header(path)
        if header is None:
            raise ValueError(f"{path}: carries no normcore header; pass its checkpoint folder")
        model_doc, in_channels = header["model"], header["in_channels"]
    else:
        folder = _folder(path)
        meta = read_meta(folder)
        verify_checkpoint(folder)
        if not isinstance(meta.get("spec"), dict) or "model" not in meta["spec"]:
            raise ValueError(f"checkpoint {folder}: meta.json holds no model spec to rebuild from")
        model_file = folder / MODEL_FILE
        model_doc, in_channels = meta["spec"]["model"], meta["in_channels"]
    model_spec = ModelSpec.model_validate(model_doc)
    # Building initializes weights from the global RNG; keep the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        model = build_model(model_spec, in_channels=int(in_channels))
    state = st_load_file(str(model_file), device="cpu")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
