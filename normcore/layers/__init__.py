"""Normalization layers: drop-in twins of torch.nn's norms plus the variants normcore adds.

Each twin is a subclass of its torch.nn class (``BatchNorm2d`` of ``nn.BatchNorm2d``,
``GroupNorm`` of ``nn.GroupNorm``, ...; ``SyncBatchNorm`` of torch's ``_BatchNorm`` only, see
``syncbn``), so torch's tools find them; BatchRenorm2d, GhostBatchNorm2d and SplitBatchNorm2d
are ``nn.BatchNorm2d`` too (their eval mode is one). Every norm layer is a ``call_module`` leaf
for ``torch.fx`` and the twins script with TorchScript (``_torch_tools``). The table of kinds
(names, classes, what each may be converted, folded, synced or recalibrated to) is
``normcore.registry``, which imports this package; this package imports nothing of normcore's
outside it but the module-surgery helper ``normcore._surgery`` (no import cycle).
"""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .evonorm import EvoNorm2dB0, EvoNorm2dS0
from .frn import FilterResponseNorm2d
from .frozen import FrozenBatchNorm2d
from .ghost import GhostBatchNorm2d
from .groupnorm import GroupNorm
from .identity import Identity
from .instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .l2norm import L2Norm
from .layernorm import LayerNorm, LayerNorm2d
from .lrn import LocalResponseNorm
from .renorm import BatchRenorm2d
from .rmsnorm import RMSNorm, RMSNorm2d
from .split import SplitBatchNorm2d
from .stdconv import StdConv2d
from .syncbn import SyncBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm2d",
    "EvoNorm2dB0",
    "EvoNorm2dS0",
    "FilterResponseNorm2d",
    "FrozenBatchNorm2d",
    "GhostBatchNorm2d",
    "GroupNorm",
    "Identity",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "L2Norm",
    "LayerNorm",
    "LayerNorm2d",
    "LocalResponseNorm",
    "RMSNorm",
    "RMSNorm2d",
    "SplitBatchNorm2d",
    "StdConv2d",
    "SyncBatchNorm",
]
