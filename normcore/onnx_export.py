"""Export a model to ONNX with conv-BN folded, and measure onnxruntime against eager.

Uses torch's ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``, the
default since torch 2.9). The older TorchScript exporter is deprecated, and on this project's
models it fails where the new one succeeds: it refuses LeNet's adaptive pool from 2x2 to 5x5
(the 8x8 digits model) and InstanceNorm's channel count read from the input, and writes a graph
onnxruntime rejects for FilterResponseNorm. The new exporter needs ``onnxscript`` besides ``onnx``; onnxruntime runs
the check. All three come with ``pip install 'normcore[onnx]'``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from normcore.fuse import fuse_conv_bn

__all__ = ["export_onnx", "onnx_max_abs_diff"]

_REQUIRED = ("onnx", "onnxscript", "onnxruntime")
# torch's exporter warns once per export that torchvision's ops are not registered
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration",)


def _require_onnx() -> Any:
    """Import the ONNX packages; return ``onnxruntime``.

    Raises:
        ImportError: naming the missing packages and the ``normcore[onnx]`` extra.
    """
    missing = []
    for name in _REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"normcore.export_onnx needs {', '.join(missing)}: pip install 'normcore[onnx]'"
        )
    return importlib.import_module("onnxruntime")


def _as_args(example: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    if isinstance(example, Tensor):
        return (example,)
    if isinstance(example, Sequence) and all(isinstance(t, Tensor) for t in example):
        return tuple(example)
    raise TypeError(
        f"example must be a Tensor or a sequence of Tensors, got {type(example).__name__}"
    )


def _leaves(output: Any) -> Iterator[Tensor]:
    """The tensors of a model output (a tensor, or tuples/lists/dicts of them), in order."""
    if isinstance(output, Tensor):
        yield output
    elif isinstance(output, Mapping):
        for value in output.values():
            yield from _leaves(value)
    elif isinstance(output, Sequence) and not isinstance(output, str):
        for value in output:
            yield from _leaves(value)
    else:
        raise TypeError(f"model output holds a {type(output).__name__}, not tensors")


def _to_numpy(t: Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        raise ValueError("onnxruntime takes no bfloat16 inputs here: use float32 or float16")
    return t.detach().cpu().numpy()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def onnx_max_abs_diff(
    path: str | os.PathLike[str], example: Tensor | Sequence[Tensor], expected: Any
) -> list[float]:
    """Run the ONNX file at ``path`` in onnxruntime (CPU) and compare with ``expected``.

    Args:
        path: an ONNX model whose inputs are the tensors of ``example``, in order.
        example: the input tensor(s).
        expected: the eager output for ``example``: a tensor, or tuples/lists/dicts of them,
            in the order the ONNX graph returns them.

    Returns:
        The largest absolute difference per output tensor (a NaN where either side is NaN).

    Raises:
        ImportError: if onnxruntime is missing (``pip install 'normcore[onnx]'``).
        ValueError: if the graph's outputs do not match ``expected`` in number or shape.
    """
    ort = _require_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: constant-folding notes are not problems
    session = ort.InferenceSession(
        os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    feeds = {
        info.name: _to_numpy(t)
        for info, t in zip(session.get_inputs(), _as_args(example), strict=True)
    }
    got = session.run(None, feeds)
    want = [_to_numpy(t) for t in _leaves(expected)]
    if len(got) != len(want):
        raise ValueError(f"the ONNX graph returns {len(got)} outputs, eager {len(want)}")
    diffs = []
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.shape != w.shape:
            raise ValueError(f"output {i}: ONNX shape {g.shape}, eager {w.shape}")
        if w.size == 0:
            diffs.append(0.0)
            continue
        diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
        diffs.append(float("nan") if np.isnan(diff).any() else float(diff.max()))
    return diffs


def _norm_names(model: nn.Module) -> list[str]:
    """Class names of the normcore layers in ``model`` (for error messages)."""
    names = {
        type(m).__name__
        for m in model.modules()
        if type(m).__module__.startswith("normcore.layers")
    }
    return sorted(names)


def _with_preprocessing(
    model: nn.Module,
    folded: nn.Module,
    args: tuple[Tensor, ...],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> tuple[nn.Module, nn.Module]:
    """(eager reference, module to export), both taking raw images first."""
    from normcore.inference import WithPreprocess

    if mean is None or std is None:
        raise ValueError(
            "include_preprocessing needs the per-channel mean and std (a Predictor's .input "
            "has them: predictor.export_onnx)"
        )
    if len(args) != 1 or args[0].ndim != 4 or args[0].shape[1] != len(mean):
        shape = [tuple(t.shape) for t in args]
        raise ValueError(
            f"include_preprocessing takes one (N, C, H, W) raw image batch with C = "
            f"{len(mean)} (one per mean), got {shape}"
        )
    return WithPreprocess(model, mean, std).eval(), WithPreprocess(folded, mean, std).eval()


def export_onnx(
    model: nn.Module,
    example: Tensor | Sequence[Tensor],
    path: str | os.PathLike[str],
    fold_bn: bool = True,
    *,
    opset_version: int | None = None,
    optimize: bool = True,
    include_preprocessing: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> float:
    """Export ``model`` to an ONNX file and return how far onnxruntime is from eager.

    The model is exported as it runs in eval mode: batch norms use their running statistics.
    With ``fold_bn`` every BN that directly follows a conv or linear layer is first folded into
    it (``normcore.fuse_conv_bn`` on a copy; ``model`` is not changed). The graph's input
    shapes are ``example``'s (static shapes). The file then runs in onnxruntime on ``example``
    and its outputs are compared with ``model``'s own eager outputs (before folding, so the
    number includes the folding's rounding).

    Args:
        model: the network, in eval mode (``model.eval()``).
        example: an input tensor, or a sequence of them for a forward with several inputs;
            float32 (float16 runs too; onnxruntime's CPU kernels have no float64 Conv and
            take no bfloat16 inputs).
        path: where to write the ``.onnx`` file (weights inside it, or beside it in an
            external-data file only past ONNX's 2 GB limit).
        fold_bn: fold conv→BN (and linear→BatchNorm1d) pairs before exporting.
        opset_version: ONNX opset; default: torch's exporter's own (18 in torch 2.11-2.13).
        optimize: run the exporter's graph optimizer (constant folding, redundant casts
            removed); off exports faster with the same numbers.
        include_preprocessing: put the training data's preprocessing in front of the graph
            (``normcore.inference.Preprocess``: uint8 / 255, then ``(x - mean) / std`` per
            channel), so the ONNX input is the raw image: (N, C, H, W) float in [0, 1], or
            uint8 in [0, 255] when ``example`` is uint8 (the graph takes the example's dtype).
            ``example`` is then raw images too. ``Predictor.export_onnx`` fills in
            ``mean`` and ``std`` from a checkpoint.
        mean, std: per-channel mean and std on the [0, 1] scale (``include_preprocessing``).

    Returns:
        The largest absolute difference between onnxruntime's outputs and eager's over every
        output element, as a float (NaN if either side produced NaN). On the models in
        ``normcore.models`` with float32 inputs it is below 1e-5 (checked by the tests).

    Raises:
        ImportError: if onnx, onnxscript or onnxruntime is missing: ``pip install
            'normcore[onnx]'``.
        ValueError: if ``model`` is in training mode (or a BN in it; folding needs running
            statistics), ``example`` is bfloat16, or ``include_preprocessing`` lacks ``mean``
            or ``std`` (or their lengths differ from the example's channels).
        TypeError: if ``example`` is not a tensor or a sequence of tensors.
        RuntimeError: if torch's exporter fails (the message names the model's normcore norm
            layers and carries torch's error), or onnxruntime cannot run the written file (a
            dtype or op its CPU kernels lack; the file stays at ``path``).
    """
    _require_onnx()
    args = _as_args(example)
    for t in args:
        if t.dtype == torch.bfloat16:
            raise ValueError("export_onnx checks in onnxruntime, which takes no bfloat16 inputs")
    if model.training:
        raise ValueError("export_onnx exports inference graphs: call model.eval() first")
    to_export = fuse_conv_bn(model) if fold_bn else model
    if include_preprocessing:
        model, to_export = _with_preprocessing(model, to_export, args, mean, std)
    with torch.no_grad():
        expected = model(*args)
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                to_export,
                args,
                dynamo=True,
                opset_version=opset_version,
                optimize=optimize,
                verbose=False,
            )
    except Exception as exc:
        norms = ", ".join(_norm_names(model)) or "none"
        raise RuntimeError(
            f"torch.onnx.export failed for {type(model).__name__} (normcore layers: {norms}): {exc}"
        ) from exc
    assert program is not None  # dynamo=True always returns the program
    program.save(os.fspath(path))
    try:
        diffs = onnx_max_abs_diff(path, args, expected)
    except (ValueError, TypeError):
        raise
    except Exception as exc:  # onnxruntime's own error types
        raise RuntimeError(f"wrote {path}, but onnxruntime cannot run it: {exc}") from exc
    return max(diffs, default=0.0, key=lambda d: float("inf") if np.isnan(d) else d)
