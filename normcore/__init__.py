"""normcore: normalization layers that match torch.nn, normalized CNNs and a training engine.

Public names are resolved lazily from the submodule that holds them, so ``import normcore``
stays cheap and a user can ``from normcore import BatchNorm2d, make_norm, train``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule (relative to normcore) that defines it
_EXPORTS: dict[str, str] = {
    # layers
    "BatchNorm1d": "layers",
    "BatchNorm2d": "layers",
    "BatchNorm3d": "layers",
    "GroupNorm": "layers",
    "LayerNorm": "layers",
    "LayerNorm2d": "layers",
    "InstanceNorm1d": "layers",
    "InstanceNorm2d": "layers",
    "InstanceNorm3d": "layers",
    "FrozenBatchNorm2d": "layers",
    "BatchRenorm2d": "layers",
    "GhostBatchNorm2d": "layers",
    "SyncBatchNorm": "layers",
    "L2Norm": "layers",
    "Identity": "layers",
    "RMSNorm": "layers",
    "LocalResponseNorm": "layers",
    "RMSNorm2d": "layers",
    "FilterResponseNorm2d": "layers",
    "EvoNorm2dB0": "layers",
    "EvoNorm2dS0": "layers",
    "SplitBatchNorm2d": "layers",
    "StdConv2d": "layers",
    "bn_from_keras": "keras",
    # factory and registry
    "make_norm": "factory",
    "register_norm": "factory",
    "available_norms": "factory",
    "validate_norm": "factory",
    "NormKind": "registry",
    "norm_kind": "registry",
    # model surgery and inference tools
    "convert_norm": "convert",
    "freeze_norm": "convert",
    "unfreeze_norm": "convert",
    "convert_sync_norm": "convert",
    "fuse_conv_bn": "fuse",
    "export_onnx": "onnx_export",
    "recalibrate_bn": "stats",
    "norm_stats": "stats",
    "check_norm_buffers": "stats",
    # spec, models, data, engine, checkpoints
    "JobSpec": "spec",
    "build_model": "models",
    "build_data": "data",
    "train": "engine",
    "TrainResult": "engine",
    "Callback": "engine",
    "load_model": "inference",
    "load_predictor": "inference",
    "Predictor": "inference",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'normcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"normcore.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
