"""Building blocks shared by the models: conv-norm-act units, norms for features, init."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

import torch
from torch import Tensor, nn

from normcore.factory import make_norm, norm_name, norm_uses_batch_stats, parse_norm
from normcore.layers.l2norm import L2Norm
from normcore.layers.stdconv import StdConv2d

NormPosition = Literal["before", "after"]
NORM_POSITIONS = ("before", "after")
CONV_KINDS = ("standard", "std")
# model.stem_padding: how the first conv pads its input. "none" is a valid convolution (no
# padding, the map shrinks by kernel_size - 1); the others are nn.Conv2d padding modes.
STEM_PADDINGS = ("zeros", "none", "reflect", "replicate")


def stem_conv_padding(kernel_size: int, stem_padding: str) -> tuple[int, str]:
    """``(padding, padding_mode)`` for a stem conv of odd ``kernel_size`` under ``stem_padding``.

    "zeros", "reflect" and "replicate" keep the size ("same" padding of ``kernel_size // 2``
    filled with zeros, the mirrored border, or the repeated edge pixel); "none" pads nothing.
    Raises ValueError for any other value.
    """
    if stem_padding not in STEM_PADDINGS:
        raise ValueError(
            f"stem_padding must be one of {', '.join(STEM_PADDINGS)}, got {stem_padding!r}"
        )
    if stem_padding == "none":
        return 0, "zeros"
    return kernel_size // 2, stem_padding


def check_args(
    *,
    in_channels: int,
    dropout: float,
    norm_position: str,
    num_classes: int | None = None,
    width: int | None = None,
    depth: int | None = None,
) -> None:
    """Raise ValueError for constructor arguments no model can use."""
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
    if norm_position not in NORM_POSITIONS:
        raise ValueError(f"norm_position must be 'before' or 'after', got {norm_position!r}")
    for label, value in (("width", width), ("depth", depth)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{label} must be a positive int, got {value!r}")


def conv_bias(norm: Any, norm_position: str = "before") -> bool:
    """Whether a conv followed by ``norm`` needs its own bias.

    A batch-statistics norm right after the conv subtracts the per-channel mean, so a conv bias
    would be removed again and the norm's own bias takes its place. With the norm after the
    activation the ReLU sits in between and the conv bias matters.
    """
    return not (norm_position == "before" and norm_uses_batch_stats(norm))


def dropout_layer(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or an ``nn.Identity`` when ``p`` is 0 so no module does nothing."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class ConvNormAct(nn.Sequential):
    """Seed 000's ConvBlock: conv → norm → ReLU (→ dropout), or conv → ReLU → norm with "after".

    ``act=False`` gives conv → norm (a projection shortcut, the last conv of a residual branch).
    ``padding_mode`` is ``nn.Conv2d``'s ("zeros", "reflect", "replicate").
    The children are named ``conv``, ``norm``, ``act``, ``dropout`` in the order they run.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        *,
        norm: Any = "bn",
        norm_position: str = "before",
        act: bool = True,
        dropout: float = 0.0,
        padding_mode: str = "zeros",
    ) -> None:
        if norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be 'before' or 'after', got {norm_position!r}")
        position = norm_position if act else "before"
        conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2 if padding is None else padding,
            bias=conv_bias(norm, position),
            padding_mode=padding_mode,
        )
        layers: list[tuple[str, nn.Module]] = [("conv", conv)]
        norm_layer = make_norm(norm, out_channels, dims=2)
        if not act:
            layers.append(("norm", norm_layer))
        elif position == "before":
            layers += [("norm", norm_layer), ("act", nn.ReLU(inplace=True))]
        else:
            layers += [("act", nn.ReLU(inplace=True)), ("norm", norm_layer)]
        if dropout > 0:
            layers.append(("dropout", nn.Dropout(dropout)))
        super().__init__(OrderedDict(layers))


class FeatureNorm(nn.Module):
    """A norm over the (N, C) features of a Linear layer, built with ``make_norm(dims=1)``.

    Norms registered for 2-d maps only (frozen_bn, brn, ghost_bn) see the features as an
    (N, C, 1, 1) map, which gives the same statistics. Instance norm has a single value per
    channel and sample here, so it would output a constant: it is left out (identity).
    The wrapped layer is ``self.norm``.
    """

    def __init__(self, norm: Any, num_features: int) -> None:
        super().__init__()
        parsed = parse_norm(norm)
        self.as_map = parsed.entry is not None and 1 not in parsed.entry.dims
        if parsed.entry is not None and norm_name(norm) == "in":
            self.norm: nn.Module = nn.Identity()
        else:
            self.norm = make_norm(norm, num_features, dims=2 if self.as_map else 1)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize (N, C) features."""
        if self.as_map:
            return self.norm(x[:, :, None, None]).flatten(1)
        return self.norm(x)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal conv weights (fan_out, ReLU) and zero conv biases; norm weight 1, bias 0.

    Linear layers keep PyTorch's default init. L2Norm keeps its initial scale (20 in SSD):
    a scale of 1 would shrink its output far below the activations around it.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear | L2Norm):
            continue
        else:
            weight = m._parameters.get("weight")
            bias = m._parameters.get("bias")
            if isinstance(weight, nn.Parameter):
                with torch.no_grad():
                    weight.fill_(1.0)
                    if isinstance(bias, nn.Parameter):
                        bias.zero_()


def use_conv(model: nn.Module, kind: str = "standard") -> nn.Module:
    """Make every plain ``nn.Conv2d`` of ``model`` the conv ``kind`` names, in place.

    ``"standard"`` leaves the model as it is; ``"std"`` swaps each for a ``StdConv2d`` that
    shares its weight and bias (the state dict keeps its keys), so every conv of the model,
    stem and shortcuts included, is weight-standardized as in GN + WS.
    """
    if kind not in CONV_KINDS:
        raise ValueError(f"conv must be one of {', '.join(CONV_KINDS)}, got {kind!r}")
    if kind == "standard":
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                setattr(parent, name, StdConv2d.from_conv(child))
    return model
