"""What an artifact task builds from a checkpoint folder: an ONNX export with its certificate,
or a recalibrated checkpoint. Runs in the artifact child process (``worker/artifacts.py``);
pure functions of files and the job's data, no store.

Export: the model is loaded from the checkpoint (eval mode, running statistics), BN folded into
the conv or linear before it when asked (``normcore.fuse_conv_bn``), exported with torch's
``torch.export``-based exporter for one image (``[1, C, H, W]``, the deployment shape), and the
written file run in onnxruntime on every image of a probe batch from the job's own validation
split: the certificate's ``max_abs_diff`` is the largest absolute logit difference from the
eager model (unfolded) over the probe, in float64.

Recalibration: precise BN (``normcore.recalibrate_bn``: running mean and variance set to the
exact averages of the batch means and unbiased batch variances over K training batches, Ioffe
& Szegedy 2015, Algorithm 2) on K batches of ``data.batch_size`` drawn without replacement from
the training split in an order seeded by the job's seed (``recalibration_batches``), then the
validation split evaluated in eval mode, and the model written as a new checkpoint folder
(model.safetensors with the original's header, meta.json) beside the original.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROBE_SIZE = 64  # validation images in the export's probe batch (fewer if the split is smaller)
TOLERANCE = 1e-4  # the largest logit difference the certificate calls equivalent


def _model_of(loaded: Any) -> Any:
    """The nn.Module of a load_model result (a module, or an object carrying ``model``)."""
    from torch import nn

    return loaded if isinstance(loaded, nn.Module) else loaded.model


def _spec_and_data(folder: Path, data_root: str | Path) -> tuple[Any, dict[str, Any], Any]:
    """(the JobSpec, meta.json, the DataBundle the job trained on) of a checkpoint folder."""
    from normcore.checkpoint import read_meta
    from normcore.data import build_data
    from normcore.spec import JobSpec

    meta = read_meta(folder)
    spec = JobSpec.model_validate(meta["spec"])
    bundle = build_data(
        spec.data, seed=spec.seed, data_root=data_root, task=spec.task, scale=spec.model.scale
    )
    return spec, meta, bundle


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def onnx_op_counts(path: str | Path) -> dict[str, int]:
    """How many nodes of each op type the ONNX graph at ``path`` holds (main graph and its
    functions, e.g. {"Conv": 3, "BatchNormalization": 0 ...}; absent ops are not listed)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    nodes = [*model.graph.node, *(n for f in model.functions for n in f.node)]
    for node in nodes:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def export_checkpoint(
    folder: str | Path,
    out_path: str | Path,
    *,
    fold_bn: bool,
    data_root: str | Path,
    probe_size: int = PROBE_SIZE,
    include_preprocessing: bool = False,
) -> dict[str, Any]:
    """Export a checkpoint folder to ONNX at ``out_path``; returns the equivalence certificate.

    The graph takes one image ``[1, C, H, W]`` normalized as in training (``input.mean`` /
    ``input.std`` in the certificate: ``(x - mean) / std`` per channel) and returns the logits;
    with ``include_preprocessing`` it takes the raw image (float in [0, 1]) and does that
    normalization in its first nodes (``normcore.export_onnx(include_preprocessing=True)``),
    and the probe is the validation images before normalization.
    Certificate keys: ``max_abs_diff`` (largest |onnxruntime - eager| over the probe's logits,
    float64), ``tolerance`` and ``within_tolerance``, ``probe`` (size, split), ``onnxruntime``,
    ``onnx`` and ``torch`` versions, ``opset``, ``fold_bn``, ``folded_layers`` (the BN layers
    folded into the conv or linear before them), ``kept_norm_layers`` (the other norm layers,
    exported as ops), ``batch_norm_nodes`` (BatchNormalization nodes in the graph), ``input``.

    Raises:
        ValueError: the checkpoint folder does not verify, or its data cannot be rebuilt.
        RuntimeError: torch's exporter or onnxruntime fails (from ``normcore.export_onnx``).
        ImportError: the onnx extra is missing.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from normcore import registry
    from normcore.checkpoint import load_model
    from normcore.fuse import fuse_conv_bn
    from normcore.onnx_export import export_onnx

    folder, out_path = Path(folder), Path(out_path)
    spec, _, bundle = _spec_and_data(folder, data_root)
    model = _model_of(load_model(folder)).float().eval()
    probe = bundle.val_x[: max(1, min(probe_size, bundle.num_val))].float()
    norm_layers = [n for n, m in model.named_modules() if registry.kind_of(m) is not None]
    to_export = fuse_conv_bn(model) if fold_bn else model
    exported = dict(to_export.named_modules())
    folded = [n for n in norm_layers if isinstance(exported.get(n), torch.nn.Identity)]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    mean, std = [float(v) for v in bundle.mean], [float(v) for v in bundle.std]
    reference: torch.nn.Module = model
    if include_preprocessing:
        from normcore.inference import WithPreprocess

        # the validation images as the reader gave them: undo build_data's normalization
        shape = (1, -1, 1, 1)
        probe = probe * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
        reference = WithPreprocess(model, mean, std).eval()
        export_onnx(
            to_export,
            probe[:1],
            out_path,
            fold_bn=False,
            include_preprocessing=True,
            mean=mean,
            std=std,
        )
    else:
        export_onnx(to_export, probe[:1], out_path, fold_bn=False)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(out_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    got = np.concatenate(
        [session.run(None, {name: probe[i : i + 1].numpy()})[0] for i in range(len(probe))]
    )
    with torch.no_grad():
        want = reference(probe).double().numpy()
    diff = np.abs(got.astype(np.float64) - want)
    max_diff = float("nan") if np.isnan(diff).any() else float(diff.max())
    counts = onnx_op_counts(out_path)
    return {
        "format": "onnx",
        "checkpoint": folder.name,
        "fold_bn": fold_bn,
        "max_abs_diff": max_diff,
        "tolerance": TOLERANCE,
        "within_tolerance": bool(math.isfinite(max_diff) and max_diff <= TOLERANCE),
        "probe": {"size": len(probe), "split": "val", "dataset": spec.data.dataset},
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "torch": torch.__version__.split("+")[0],
        "opset": _opset(out_path),
        "folded_layers": folded,
        "kept_norm_layers": [n for n in norm_layers if n not in folded],
        "batch_norm_nodes": counts.get("BatchNormalization", 0),
        "input": {
            "name": name,
            "shape": [1, *probe.shape[1:]],
            "normalized": not include_preprocessing,
            "preprocessing_in_graph": include_preprocessing,
            "value_range": [0.0, 1.0] if include_preprocessing else None,
            "mean": mean,
            "std": std,
        },
        "outputs": [o.name for o in session.get_outputs()],
    }


def recalibration_batches(bundle: Any, spec: Any, batches: int) -> Iterator[Any]:
    """The training images a recalibration of ``batches`` batches uses, in order: batches of
    ``spec.data.batch_size`` in a permutation of the train split drawn from a generator seeded
    with ``spec.seed`` (the same batches every time; at most one pass over the split)."""
    import torch

    generator = torch.Generator().manual_seed(int(spec.seed))
    order = torch.randperm(bundle.num_train, generator=generator)
    size = spec.data.batch_size
    for k in range(min(batches, bundle.num_train // size)):
        yield bundle.train_x[order[k * size : (k + 1) * size]]


def evaluate(model: Any, bundle: Any, batch_size: int) -> dict[str, float]:
    """``val_loss`` and ``val_accuracy`` (cross entropy; super-resolution: L1 and ``val_psnr``
    in dB on [0, 1] images) of ``model`` in eval mode over the validation split, as the engine
    reports them."""
    import torch
    import torch.nn.functional as F

    model.eval()
    sr = bundle.task == "super_resolution"
    loss_sum, score_sum, count = 0.0, 0.0, 0
    with torch.no_grad():
        for x, y in bundle.val_batches(batch_size):
            out = model(x).float()
            n = int(y.shape[0])
            count += n
            if sr:
                loss_sum += float(F.l1_loss(out, y)) * n
                mse = (out.clamp(0, 1) - y.float()).square().flatten(1).mean(1)
                score_sum += float((-10.0 * torch.log10(mse.clamp_min(1e-10))).sum())
            else:
                loss_sum += float(F.cross_entropy(out, y)) * n
                score_sum += float((out.argmax(1) == y).sum())
    n = max(count, 1)
    return {"val_loss": loss_sum / n, ("val_psnr" if sr else "val_accuracy"): score_sum / n}


def _write_synced(path: Path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recalibrated_name(checkpoint: str, batches: int) -> str:
    """The name of ``checkpoint`` recalibrated over ``batches`` batches: ``epoch-0003-recal50``."""
    return f"{checkpoint}-recal{batches}"


def recalibrate_checkpoint(
    folder: str | Path, *, batches: int, data_root: str | Path
) -> dict[str, Any]:
    """Recalibrate a checkpoint's BN statistics over ``batches`` training batches and write it
    as ``<folder>-recal<batches>`` beside ``folder`` (atomically: a temporary folder, fsynced,
    renamed). Returns {name, path, epoch, step, bytes, sha256, files, metrics, original_metrics,
    batches, batches_used}: ``metrics`` are the new checkpoint's validation metrics,
    ``original_metrics`` the original's, both measured here the same way.

    Raises:
        ValueError: ``batches`` < 1, the model holds no layer with running statistics, or the
            checkpoint folder does not verify.
    """
    from safetensors.torch import save as st_save

    from normcore.checkpoint import MODEL_FILE, load_model, read_model_header
    from normcore.stats import has_recalibratable_layers, recalibrate_bn

    if batches < 1:
        raise ValueError(f"batches must be at least 1, got {batches}")
    folder = Path(folder)
    spec, meta, bundle = _spec_and_data(folder, data_root)
    model = _model_of(load_model(folder)).float().eval()
    if not has_recalibratable_layers(model):
        raise ValueError(
            f"model.norm {spec.model.norm!r} keeps no running statistics: nothing to recalibrate"
        )
    eval_batch = spec.data.eval_batch_size or spec.data.batch_size
    original_metrics = evaluate(model, bundle, eval_batch)
    used = sum(1 for _ in recalibration_batches(bundle, spec, batches))
    recalibrate_bn(model, recalibration_batches(bundle, spec, batches), num_batches=used)
    metrics = evaluate(model, bundle, eval_batch)

    name = recalibrated_name(folder.name, batches)
    final = folder.parent / name
    tmp = folder.parent / f".{name}.tmp-{os.getpid()}"
    header = read_model_header(folder / MODEL_FILE)
    metadata = None
    if header is not None:
        header = {**header, "metrics": metrics, "recalibrated_from": folder.name}
        metadata = {"normcore": json.dumps(header, sort_keys=True)}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    model_bytes = st_save(state, metadata=metadata)
    doc = {
        key: value
        for key, value in meta.items()
        if key not in ("files", "metrics", "name", "partial_epoch")
    }
    doc |= {
        "name": name,
        "metrics": metrics,
        "recalibrated_from": {
            "checkpoint": folder.name,
            "batches": batches,
            "batches_used": used,
            "batch_size": spec.data.batch_size,
            "metrics": original_metrics,
        },
    }
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        digest = _write_synced(tmp / MODEL_FILE, model_bytes)
        files = {MODEL_FILE: {"sha256": digest, "bytes": len(model_bytes)}}
        meta_bytes = json.dumps({**doc, "files": files}, indent=2, sort_keys=True).encode()
        _write_synced(tmp / "meta.json", meta_bytes)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "name": name,
        "path": str(final),
        "epoch": int(meta.get("epoch", 0)),
        "step": int(meta.get("step", 0)),
        "bytes": len(model_bytes),
        "sha256": digest,
        "files": {MODEL_FILE: digest},
        "metrics": metrics,
        "original_metrics": original_metrics,
        "batches": batches,
        "batches_used": used,
    }
