"""A model's parameter count from its spec, without building the model.

The service checks a submitted spec against its parameter limit in the API process. Building
the model there, even on the meta device, costs time and memory that grow with the number of
modules (a ``split_bn:4000`` resnet18 is 20 million module objects' worth of Python work), so
:func:`count_parameters` adds up the layer shapes each builder in ``normcore.models`` creates.
Only the norm layers are built, one per distinct (channels, dims), on the meta device (no
memory), so a norm's own parameter layout (FRN's tau, split BN's auxiliary BNs, ``affine=False``)
is never restated here. ``tests/normcore/test_model_size.py`` checks every arch x norm x
position x width against the built model.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from normcore.factory import make_norm, norm_name, norm_uses_batch_stats, parse_norm
from normcore.models.edsr import _factors
from normcore.models.vgg import VGG11_CONFIG

if TYPE_CHECKING:
    from normcore.spec import ModelSpec

__all__ = ["count_parameters"]

# The builders' defaults (normcore.models.*): base width, and depth where it is a knob.
DEFAULT_WIDTH = {
    "convblock": 32,
    "lenet": 8,
    "vgg11": 64,
    "resnet20": 16,
    "resnet18": 64,
    "edsr": 64,
}
DEFAULT_DEPTH = {"convblock": 3, "edsr": 4}


@functools.lru_cache(maxsize=4096)
def _norm_params_cached(norm_json: str, channels: int, dims: int) -> int:
    """Parameters of one norm layer built on meta, by the norm's JSON text (a spec's norm is a
    string or a flat dict, so the JSON text identifies it)."""
    with torch.device("meta"):
        layer = make_norm(json.loads(norm_json), channels, dims=dims)
    return sum(p.numel() for p in layer.parameters())


def _conv(cin: int, cout: int, k: int, bias: bool) -> int:
    return cout * cin * k * k + (cout if bias else 0)


def _linear(fin: int, fout: int, bias: bool = True) -> int:
    return fin * fout + (fout if bias else 0)


class _Counter:
    """Parameter counts of the pieces the builders share, for one norm and norm position."""

    def __init__(self, norm: Any, norm_position: str) -> None:
        self.norm = norm
        self.position = norm_position
        batch_stats = norm_uses_batch_stats(norm)
        self.bias_before = not batch_stats  # blocks.conv_bias(norm, "before")
        self.bias = not (norm_position == "before" and batch_stats)  # conv_bias(norm, position)
        self._cache: dict[tuple[int, int], int] = {}
        try:
            self._norm_json: str | None = json.dumps(norm, sort_keys=True)
        except (TypeError, ValueError):
            self._norm_json = None

    def norm_params(self, channels: int, dims: int = 2) -> int:
        """Parameters of ``make_norm(norm, channels, dims=dims)``, built once on meta."""
        key = (channels, dims)
        if key not in self._cache:
            if self._norm_json is not None:
                self._cache[key] = _norm_params_cached(self._norm_json, channels, dims)
            else:  # a class or callable (library use): not cached across calls
                with torch.device("meta"):
                    layer = make_norm(self.norm, channels, dims=dims)
                self._cache[key] = sum(p.numel() for p in layer.parameters())
        return self._cache[key]

    def feature_norm(self, features: int) -> int:
        """blocks.FeatureNorm: a 1-d norm (2-d for map-only norms); instance norm is identity."""
        parsed = parse_norm(self.norm)
        if parsed.entry is not None and norm_name(self.norm) == "in":
            return 0
        as_map = parsed.entry is not None and 1 not in parsed.entry.dims
        return self.norm_params(features, dims=2 if as_map else 1)

    def conv_norm_act(self, cin: int, cout: int, k: int, act: bool = True) -> int:
        """blocks.ConvNormAct: conv (bias unless a batch norm follows it) and its norm."""
        return _conv(cin, cout, k, self.bias if act else self.bias_before) + self.norm_params(cout)


def _convblock(c: _Counter, cin: int, classes: int, width: int, depth: int) -> int:
    total = sum(c.conv_norm_act(cin if i == 0 else width, width, 3) for i in range(depth))
    return total + _linear(width, classes)


def _lenet(c: _Counter, cin: int, classes: int, width: int) -> int:
    c1, c2, f1, f2 = width, 2 * width, 16 * width, 8 * width
    total = c.conv_norm_act(cin, c1, 5) + c.conv_norm_act(c1, c2, 5)
    total += _linear(c2 * 25, f1, c.bias) + c.feature_norm(f1)
    total += _linear(f1, f2, c.bias) + c.feature_norm(f2)
    return total + _linear(f2, classes)


def _vgg11(c: _Counter, cin: int, classes: int, width: int) -> int:
    total, channels = 0, cin
    for item in VGG11_CONFIG:
        if item == "M":
            continue
        out = int(item) * width // 64
        total += c.conv_norm_act(channels, out, 3)
        channels = out
    return total + _linear(channels, channels) + _linear(channels, classes)


def _resnet(
    c: _Counter,
    cin: int,
    classes: int,
    width: int,
    blocks: tuple[int, ...],
    stem_kernel: int,
    shortcut: str,
) -> int:
    total = c.conv_norm_act(cin, width, stem_kernel)
    channels = width
    for i, count in enumerate(blocks):
        out = width * 2**i
        for j in range(count):
            block_in = channels if j == 0 else out
            stride = 2 if i > 0 and j == 0 else 1
            total += c.conv_norm_act(block_in, out, 3)
            total += _conv(out, out, 3, c.bias) + c.norm_params(out)
            if not (stride == 1 and block_in == out) and shortcut == "B":
                total += c.conv_norm_act(block_in, out, 1, act=False)
        channels = out
    return total + _linear(channels, classes)


def _edsr(c: _Counter, cin: int, scale: int, width: int, depth: int) -> int:
    total = _conv(cin, width, 3, True)
    per_block = _conv(width, width, 3, c.bias) + _conv(width, width, 3, c.bias_before)
    total += depth * (per_block + 2 * c.norm_params(width))
    total += _conv(width, width, 3, True)
    total += sum(_conv(width, width * f * f, 3, True) for f in _factors(scale))
    return total + _conv(width, cin, 3, True)


_ARCHS: dict[str, Callable[[_Counter, int, ModelSpec, int, int], int]] = {
    "convblock": lambda c, cin, m, w, d: _convblock(c, cin, m.num_classes, w, d),
    "lenet": lambda c, cin, m, w, d: _lenet(c, cin, m.num_classes, w),
    "vgg11": lambda c, cin, m, w, d: _vgg11(c, cin, m.num_classes, w),
    "resnet20": lambda c, cin, m, w, d: _resnet(c, cin, m.num_classes, w, (3, 3, 3), 3, "A"),
    "resnet18": lambda c, cin, m, w, d: _resnet(c, cin, m.num_classes, w, (2, 2, 2, 2), 7, "B"),
    "edsr": lambda c, cin, m, w, d: _edsr(c, cin, m.scale, w, d),
}


def count_parameters(spec: ModelSpec, *, in_channels: int) -> int:
    """Trainable parameters of ``build_model(spec, in_channels=in_channels)``, not building it.

    Exact for every arch of ``normcore.models`` and every norm the factory knows (norm layers
    are built on the meta device to count theirs). Takes well under a millisecond per arch plus
    one meta norm per distinct channel count.

    Raises:
        ValueError: what ``build_model`` would raise for this spec (an unknown arch, a depth on
            an arch without one, a group count that does not divide a layer's channels, ...).
    """
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    count = _ARCHS.get(spec.arch)
    if count is None:
        raise ValueError(f"unknown arch {spec.arch!r}; valid: {', '.join(_ARCHS)}")
    if spec.depth is not None and spec.arch not in DEFAULT_DEPTH:
        raise ValueError(
            f"model.depth applies to {' and '.join(DEFAULT_DEPTH)} only; "
            f"{spec.arch} has a fixed depth: remove model.depth"
        )
    width = spec.width or DEFAULT_WIDTH[spec.arch]
    depth = spec.depth or DEFAULT_DEPTH.get(spec.arch, 0)
    return count(_Counter(spec.norm, spec.norm_position), in_channels, spec, width, depth)
