"""The norm factory: build a normalization layer from a short spec, and a registry of names.

A spec is one of

- a name: ``"bn"``, ``"gn"``, ``"ln"``, ``"in"``, ``"frozen_bn"``, ``"brn"``, ``"ghost_bn"``,
  ``"sync_bn"``, ``"l2"``, ``"rms"``, ``"rms2d"``, ``"lrn"``, ``"frn"``, ``"evo_b0"``,
  ``"evo_s0"``, ``"split_bn"``, ``"none"`` (or an alias such as ``"batch"``, ``"group_norm"``);
  case, ``_`` and ``-`` do not matter;
- a name with its main argument after a colon: ``"gn:8"`` (8 groups), ``"ghost_bn:16"``
  (virtual batch size), ``"l2:10"`` (initial scale), ``"evo_s0:8"`` (groups), ``"split_bn:3"``
  (splits), ``"lrn:5"`` (window size);
- a name with keyword arguments: ``"bn(momentum=0.01, eps=1e-3)"``, ``"gn:8(eps=1e-6)"``;
  values are Python literals, parsed with ``ast.literal_eval`` (nothing is evaluated);
- a dict: ``{"type": "batch", "momentum": 0.01}`` (``"name"`` works as well as ``"type"``);
- a class or a callable called as ``spec(num_channels, **kwargs)``; ``None`` means ``"none"``.

Every mistake raises ``ValueError`` with the valid choices, at the point of the mistake.

Momentum follows torch's convention (``running = (1 - m) * running + m * batch``). The keyword
``momentum_convention="keras"`` (to ``make_norm``, or inside a spec) reads ``momentum`` the
Keras way (``moving = m * moving + (1 - m) * batch``), so Keras' 0.99 becomes 0.01 here.
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

__all__ = [
    "NormEntry",
    "available_norms",
    "make_norm",
    "norm_name",
    "norm_uses_batch_stats",
    "parse_norm",
    "register_norm",
    "validate_norm",
]

NormSpec = str | Mapping[str, Any] | type | Callable[..., nn.Module] | None
T = TypeVar("T")

MOMENTUM_CONVENTIONS = ("torch", "keras")

DEFAULT_GROUPS = 32  # Wu & He (2018): 32 groups


@dataclass(frozen=True)
class NormEntry:
    """One registered norm: its canonical name, how to build it, and what it accepts.

    ``builder(num_channels, dims=..., **kwargs)`` when ``takes_dims``, else
    ``builder(num_channels, **kwargs)``. ``arg`` is the keyword the ``name:value`` form sets.
    ``signature`` returns the callable whose signature lists the accepted keywords.
    """

    name: str
    builder: Callable[..., nn.Module]
    aliases: tuple[str, ...] = ()
    batch_stats: bool = False
    arg: str | None = None
    takes_dims: bool = False
    dims: tuple[int, ...] = (1, 2, 3)
    signature: Callable[[], Callable[..., Any]] | None = None
    check: Callable[[dict[str, Any], int | None], None] | None = None


_REGISTRY: dict[str, NormEntry] = {}  # canonical name -> entry
_LOOKUP: dict[str, str] = {}  # normalized name or alias -> canonical name


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


def _add(entry: NormEntry, *, override: bool = False) -> None:
    keys = {_key(entry.name), *(_key(a) for a in entry.aliases)}
    if not override:
        taken = sorted(k for k in keys if k in _LOOKUP)
        if taken:
            raise ValueError(
                f"cannot register norm {entry.name!r}: {', '.join(taken)} already names "
                f"{_LOOKUP[taken[0]]!r}; pass override=True to replace it"
            )
    else:
        old = _REGISTRY.pop(entry.name, None)
        if old is not None:
            for alias in (old.name, *old.aliases):
                _LOOKUP.pop(_key(alias), None)
    _REGISTRY[entry.name] = entry
    for k in keys:
        _LOOKUP[k] = entry.name


def register_norm(
    name: str,
    *,
    aliases: Iterable[str] = (),
    batch_stats: bool = False,
    arg: str | None = None,
    override: bool = False,
) -> Callable[[T], T]:
    """Decorator registering a norm class or factory function under ``name`` (and aliases).

    The decorated object is called as ``obj(num_channels, **kwargs)`` (plus ``dims=`` if it
    takes a ``dims`` parameter). ``batch_stats`` says whether it needs a batch of more than
    one sample in training; ``arg`` is the keyword that ``"name:value"`` sets.
    """
    if not name or not re.fullmatch(r"[A-Za-z][\w\-]*", name):
        raise ValueError(f"norm name must be letters, digits, '_' or '-', got {name!r}")

    def decorate(obj: T) -> T:
        if not callable(obj):
            raise ValueError(f"register_norm({name!r}) needs a class or a function, got {obj!r}")
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            params = {}
        _add(
            NormEntry(
                name=name,
                builder=obj,  # type: ignore[arg-type]
                aliases=tuple(aliases),
                batch_stats=batch_stats,
                arg=arg,
                takes_dims="dims" in params,
                signature=lambda: obj,  # type: ignore[return-value]
            ),
            override=override,
        )
        return obj

    return decorate


def available_norms() -> list[str]:
    """Canonical names of every registered norm, sorted."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ParsedNorm:
    """A spec resolved to a registry entry (or a user callable) and its keyword arguments."""

    entry: NormEntry | None
    target: Callable[..., nn.Module] | None
    kwargs: dict[str, Any]
    text: str


_SPEC_RE = re.compile(
    r"^\s*(?P<name>[A-Za-z][\w\-]*)\s*(?::\s*(?P<arg>[^()]*?))?\s*(?:\((?P<args>.*)\))?\s*$",
    re.DOTALL,
)


def _literal(text: str, where: str) -> Any:
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        stripped = text.strip()
        if re.fullmatch(r"[A-Za-z_]\w*", stripped):
            return stripped  # bare word, e.g. gn:auto is a string
        raise ValueError(f"{where}: cannot read {stripped!r} as a value") from None


def _parse_call_args(args: str, spec: str) -> tuple[list[Any], dict[str, Any]]:
    try:
        tree = ast.parse(f"f({args})", mode="eval")
    except SyntaxError:
        raise ValueError(
            f"cannot parse the arguments of norm spec {spec!r}; write them as "
            "name(key=value, ...), e.g. 'bn(momentum=0.01, eps=1e-3)'"
        ) from None
    call = tree.body
    assert isinstance(call, ast.Call)
    positional = []
    kwargs: dict[str, Any] = {}
    for node in call.args:
        try:
            positional.append(ast.literal_eval(node))
        except ValueError:
            raise ValueError(
                f"norm spec {spec!r}: argument {ast.unparse(node)!r} is not a literal"
            ) from None
    for kw in call.keywords:
        if kw.arg is None:
            raise ValueError(f"norm spec {spec!r}: '**' is not allowed")
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            # a bare word such as mode=fast reads as the string "fast"
            if isinstance(kw.value, ast.Name):
                kwargs[kw.arg] = kw.value.id
            else:
                raise ValueError(
                    f"norm spec {spec!r}: value of {kw.arg!r} ({ast.unparse(kw.value)!r}) "
                    "is not a literal"
                ) from None
    return positional, kwargs


def _lookup(name: str) -> NormEntry:
    canonical = _LOOKUP.get(_key(name))
    if canonical is None:
        valid = ", ".join(available_norms())
        close = difflib.get_close_matches(_key(name), list(_LOOKUP), n=1, cutoff=0.6)
        hint = f"; did you mean {_LOOKUP[close[0]]!r}?" if close else ""
        raise ValueError(f"unknown norm {name!r}; valid: {valid}{hint}")
    return _REGISTRY[canonical]


def _from_name(name: str, short: str | None, args: str | None, text: str) -> ParsedNorm:
    entry = _lookup(name)
    kwargs: dict[str, Any] = {}
    positional: list[Any] = []
    if short is not None and short.strip():
        positional.append(_literal(short, f"norm spec {text!r}"))
    if args is not None and args.strip():
        more, kwargs = _parse_call_args(args, text)
        positional.extend(more)
    if positional:
        if entry.arg is None:
            raise ValueError(
                f"norm {entry.name!r} takes no positional argument (got {positional[0]!r} "
                f"in {text!r}); pass keywords, e.g. '{entry.name}(eps=1e-3)'"
            )
        if len(positional) > 1:
            raise ValueError(
                f"norm {entry.name!r} takes one positional argument ({entry.arg}), "
                f"got {len(positional)} in {text!r}"
            )
        if entry.arg in kwargs:
            raise ValueError(f"norm spec {text!r} gives {entry.arg!r} twice")
        kwargs = {entry.arg: positional[0], **kwargs}
    return ParsedNorm(entry=entry, target=None, kwargs=kwargs, text=text)


def _registered_for(obj: Any) -> NormEntry | None:
    for entry in _REGISTRY.values():
        if entry.builder is obj:
            return entry
    return None


def parse_norm(spec: NormSpec) -> ParsedNorm:
    """Resolve ``spec`` to a registry entry (or callable) and keyword arguments, or raise."""
    if spec is None:
        return ParsedNorm(entry=_lookup("none"), target=None, kwargs={}, text="none")
    if isinstance(spec, str):
        m = _SPEC_RE.match(spec)
        if m is None:
            raise ValueError(
                f"cannot parse norm spec {spec!r}; expected a name such as 'bn', 'gn:8' or "
                f"'bn(momentum=0.01)'; valid names: {', '.join(available_norms())}"
            )
        return _from_name(m["name"], m["arg"], m["args"], spec.strip())
    if isinstance(spec, Mapping):
        spec = dict(spec)
        keys = [k for k in ("type", "name") if k in spec]
        if len(keys) != 1:
            raise ValueError(
                f"a norm dict needs exactly one of 'type' or 'name' (e.g. "
                f"{{'type': 'bn', 'momentum': 0.01}}), got keys {sorted(map(str, spec))}"
            )
        name = spec.pop(keys[0])
        if not isinstance(name, str):
            raise ValueError(f"norm dict {keys[0]!r} must be a string, got {name!r}")
        bad = [k for k in spec if not isinstance(k, str)]
        if bad:
            raise ValueError(f"norm dict keys must be strings, got {bad!r}")
        parsed = parse_norm(name)
        overlap = sorted(set(parsed.kwargs) & set(spec))
        if overlap:
            raise ValueError(f"norm dict gives {overlap[0]!r} twice (in the name and as a key)")
        return ParsedNorm(parsed.entry, None, {**parsed.kwargs, **spec}, f"{name}{spec}")
    if isinstance(spec, type | functools.partial) or callable(spec):
        entry = _registered_for(spec)
        if entry is not None:
            return ParsedNorm(entry=entry, target=None, kwargs={}, text=entry.name)
        label = getattr(spec, "__name__", None) or repr(spec)
        return ParsedNorm(entry=None, target=spec, kwargs={}, text=label)  # type: ignore[arg-type]
    raise ValueError(
        f"a norm spec must be a name, a dict, a class or a callable, got {type(spec).__name__} "
        f"{spec!r}; valid names: {', '.join(available_norms())}"
    )


# --------------------------------------------------------------------------- checking


def _accepted(fn: Callable[..., Any], skip_first: bool) -> tuple[set[str], bool]:
    """Keyword names ``fn`` accepts after its first (channel) parameter, and whether **kwargs."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return set(), True
    if (
        skip_first
        and params
        and params[0].kind
        in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )
    ):
        params = params[1:]
    names = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return names, var_kw


def _check_values(label: str, kwargs: Mapping[str, Any]) -> None:
    """Reject values of the common keywords that no norm layer could use."""
    for key, value in kwargs.items():
        if key == "eps" and (
            isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
        ):
            raise ValueError(f"{label}: eps must be a positive number, got {value!r}")
        if (
            key == "momentum"
            and value is not None
            and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0.0 <= value <= 1.0
            )
        ):
            raise ValueError(f"{label}: momentum must be a number in [0, 1] or None, got {value!r}")
        if key in ("affine", "track_running_stats", "bias", "elementwise_affine") and not (
            isinstance(value, bool)
        ):
            raise ValueError(f"{label}: {key} must be true or false, got {value!r}")


def _check_kwargs(parsed: ParsedNorm, kwargs: Mapping[str, Any], dims: int) -> None:
    entry = parsed.entry
    label = entry.name if entry is not None else parsed.text
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    if entry is not None and dims not in entry.dims:
        ok = ", ".join(map(str, entry.dims))
        raise ValueError(f"norm {entry.name!r} supports dims {ok}, got dims={dims}")
    if entry is not None:
        target = entry.signature() if entry.signature is not None else entry.builder
        accepted, var_kw = _accepted(target, skip_first=True)
        if entry.arg:
            accepted.add(entry.arg)
        accepted.discard("dims")
    else:
        assert parsed.target is not None
        accepted, var_kw = _accepted(parsed.target, skip_first=True)
    if not var_kw:
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ValueError(
                f"norm {label!r} got unknown keyword {unknown[0]!r}; "
                f"accepted: {', '.join(sorted(accepted)) or '(none)'}"
            )
    _check_values(f"norm {label!r}", kwargs)


def _apply_convention(label: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop ``momentum_convention`` from ``kwargs`` and turn a Keras momentum into torch's."""
    convention = kwargs.pop("momentum_convention", "torch")
    if convention not in MOMENTUM_CONVENTIONS:
        raise ValueError(
            f"{label}: momentum_convention must be 'torch' or 'keras', got {convention!r}"
        )
    if convention == "keras" and "momentum" in kwargs:
        m = kwargs["momentum"]
        if isinstance(m, bool) or not isinstance(m, int | float) or not 0.0 <= m <= 1.0:
            raise ValueError(
                f"{label}: a Keras momentum must be a number in [0, 1] (e.g. 0.99), got {m!r}"
            )
        # Keras keeps m of the old average, torch mixes in m of the batch; rounding drops the
        # float noise of 1 - m (Keras momenta are written as short decimals such as 0.99)
        kwargs["momentum"] = round(1.0 - float(m), 12)
    return kwargs


def _resolve(spec: NormSpec, dims: int, overrides: Mapping[str, Any]) -> ParsedNorm:
    parsed = parse_norm(spec)
    label = f"norm {parsed.entry.name if parsed.entry is not None else parsed.text!r}"
    kwargs = _apply_convention(label, {**parsed.kwargs, **overrides})
    _check_kwargs(parsed, kwargs, dims)
    return ParsedNorm(parsed.entry, parsed.target, kwargs, parsed.text)


def validate_norm(spec: NormSpec, num_channels: int | None = None, *, dims: int = 2) -> None:
    """Raise the ValueError ``make_norm`` would raise for ``spec``, without building a layer.

    Checks the name, the argument names and values; with ``num_channels`` also the checks
    that depend on it (e.g. that ``gn:8`` divides the channels).
    """
    parsed = _resolve(spec, dims, {})
    if parsed.entry is not None and parsed.entry.check is not None:
        parsed.entry.check(parsed.kwargs, num_channels)


def make_norm(
    spec: NormSpec,
    num_channels: int,
    *,
    dims: int = 2,
    momentum_convention: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build the normalization layer ``spec`` describes for ``num_channels`` channels.

    ``dims`` (1, 2 or 3) picks BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, LayerNorm vs
    LayerNorm2d and RMSNorm vs RMSNorm2d. ``overrides`` are keyword arguments that replace
    those given in the spec. ``momentum_convention="keras"`` reads ``momentum`` as Keras does
    (0.99 there is 0.01 here); the default is torch's.
    """
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
    if momentum_convention is not None:
        overrides = {**overrides, "momentum_convention": momentum_convention}
    parsed = _resolve(spec, dims, overrides)
    entry = parsed.entry
    if entry is None:
        assert parsed.target is not None
        return parsed.target(num_channels, **parsed.kwargs)
    if entry.check is not None:
        entry.check(parsed.kwargs, num_channels)
    if entry.takes_dims:
        return entry.builder(num_channels, dims=dims, **parsed.kwargs)
    return entry.builder(num_channels, **parsed.kwargs)


def norm_name(spec: NormSpec) -> str:
    """Canonical registry name of ``spec`` (e.g. ``"gn"`` for ``"group_norm:8"``)."""
    parsed = parse_norm(spec)
    return parsed.entry.name if parsed.entry is not None else parsed.text


def norm_uses_batch_stats(spec: NormSpec) -> bool:
    """True when ``spec`` normalizes with batch statistics in training (bn, brn, ghost_bn, ...).

    Such a norm cannot train on batches of one sample. Unregistered classes count when they
    subclass a torch or normcore BatchNorm (FrozenBatchNorm2d does not).
    """
    parsed = parse_norm(spec)
    if parsed.entry is not None:
        return parsed.entry.batch_stats
    target = parsed.target
    if isinstance(target, functools.partial):
        target = target.func
    if isinstance(target, type):
        from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

        from normcore.layers.batchnorm import _BatchNorm

        return issubclass(target, _TorchBatchNorm | _BatchNorm)
    return False


# --------------------------------------------------------------------------- built-ins


def _need_int(label: str, key: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{label}: {key} must be an integer >= {low}, got {value!r}")
    return value


def _default_groups(num_channels: int) -> int:
    """32 groups, or the largest divisor of num_channels below 32 when 32 does not divide it."""
    if num_channels % DEFAULT_GROUPS == 0:
        return DEFAULT_GROUPS
    return max(d for d in range(1, min(DEFAULT_GROUPS, num_channels) + 1) if num_channels % d == 0)


def _check_gn(kwargs: dict[str, Any], num_channels: int | None) -> None:
    if "num_groups" not in kwargs:
        return
    groups = _need_int("norm 'gn'", "num_groups", kwargs["num_groups"])
    if num_channels is not None and num_channels % groups != 0:
        raise ValueError(
            f"gn:{groups} needs num_channels divisible by {groups}, got {num_channels}; "
            f"divisors of {num_channels}: "
            f"{', '.join(str(d) for d in range(1, num_channels + 1) if num_channels % d == 0)}"
        )


def _check_ghost(kwargs: dict[str, Any], num_channels: int | None) -> None:
    if "virtual_batch_size" in kwargs:
        _need_int("norm 'ghost_bn'", "virtual_batch_size", kwargs["virtual_batch_size"], low=2)


def _check_brn(kwargs: dict[str, Any], num_channels: int | None) -> None:
    for key, low in (("r_max", 1.0), ("d_max", 0.0)):
        value = kwargs.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low:
            raise ValueError(f"norm 'brn': {key} must be a number >= {low:g}, got {value!r}")
    for key in ("warmup_steps", "warmup_start"):
        if key in kwargs:
            _need_int("norm 'brn'", key, kwargs[key], low=0)


def _check_l2(kwargs: dict[str, Any], num_channels: int | None) -> None:
    value = kwargs.get("scale", 1.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"norm 'l2': scale must be a number, got {value!r}")


def _check_evo_s0(kwargs: dict[str, Any], num_channels: int | None) -> None:
    if "num_groups" not in kwargs:
        return
    groups = _need_int("norm 'evo_s0'", "num_groups", kwargs["num_groups"])
    if num_channels is not None and num_channels % groups != 0:
        raise ValueError(
            f"evo_s0:{groups} needs num_channels divisible by {groups}, got {num_channels}"
        )


def _check_split(kwargs: dict[str, Any], num_channels: int | None) -> None:
    if "num_splits" in kwargs:
        _need_int("norm 'split_bn'", "num_splits", kwargs["num_splits"], low=2)


def _check_lrn(kwargs: dict[str, Any], num_channels: int | None) -> None:
    if "size" in kwargs:
        _need_int("norm 'lrn'", "size", kwargs["size"])


def _by_dims(*names: str) -> Callable[[int], type[nn.Module]]:
    def pick(dims: int) -> type[nn.Module]:
        from normcore import layers

        return getattr(layers, names[dims - 1])

    return pick


_BN = _by_dims("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
_IN = _by_dims("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")


def _layer(name: str) -> Callable[[], type[nn.Module]]:
    def get() -> type[nn.Module]:
        from normcore import layers

        return getattr(layers, name)

    return get


def _sync_cls() -> type[nn.Module]:
    # imported lazily: the factory must work before and without the sync module's deps
    from normcore.layers.syncbn import SyncBatchNorm

    return SyncBatchNorm


def _sync_signature() -> Callable[..., Any]:
    try:
        return _sync_cls()
    except ImportError:

        def sync_signature(
            num_features: int,
            eps: float = 1e-5,
            momentum: float | None = 0.1,
            affine: bool = True,
            track_running_stats: bool = True,
            process_group: Any = None,
            device: Any = None,
            dtype: Any = None,
            *,
            bias: bool = True,
        ) -> None: ...

        return sync_signature


def _build_bn(num_channels: int, dims: int = 2, **kwargs: Any) -> nn.Module:
    return _BN(dims)(num_channels, **kwargs)


def _build_in(num_channels: int, dims: int = 2, **kwargs: Any) -> nn.Module:
    return _IN(dims)(num_channels, **kwargs)


def _build_gn(num_channels: int, num_groups: int | None = None, **kwargs: Any) -> nn.Module:
    groups = _default_groups(num_channels) if num_groups is None else num_groups
    return _layer("GroupNorm")()(groups, num_channels, **kwargs)


def _ln_signature() -> Callable[..., Any]:
    def ln_signature(
        num_channels: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None: ...

    return ln_signature


def _build_ln(num_channels: int, dims: int = 2, **kwargs: Any) -> nn.Module:
    if dims == 1:
        return _layer("LayerNorm")()(num_channels, **kwargs)
    return _layer("LayerNorm2d")()(num_channels, **kwargs)


def _rms_signature() -> Callable[..., Any]:
    def rms_signature(
        num_channels: int,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None: ...

    return rms_signature


def _build_rms(num_channels: int, dims: int = 2, **kwargs: Any) -> nn.Module:
    if dims == 1:
        return _layer("RMSNorm")()(num_channels, **kwargs)
    if kwargs.get("eps", 0.0) is None:
        kwargs.pop("eps")  # RMSNorm2d has a fixed default eps
    return _layer("RMSNorm2d")()(num_channels, **kwargs)


def _lrn_signature() -> Callable[..., Any]:
    def lrn_signature(
        num_channels: int, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0
    ) -> None: ...

    return lrn_signature


def _build_lrn(num_channels: int, size: int = 5, **kwargs: Any) -> nn.Module:
    # the window is over channels, so the channel count itself is not a parameter
    return _layer("LocalResponseNorm")()(size, **kwargs)


def _evo_s0_signature() -> Callable[..., Any]:
    def evo_s0_signature(
        num_channels: int,
        num_groups: int | None = None,
        eps: float = 1e-5,
        device: Any = None,
        dtype: Any = None,
    ) -> None: ...

    return evo_s0_signature


def _build_evo_s0(num_channels: int, num_groups: int | None = None, **kwargs: Any) -> nn.Module:
    groups = _default_groups(num_channels) if num_groups is None else num_groups
    return _layer("EvoNorm2dS0")()(num_channels, groups, **kwargs)


def _build_sync(num_channels: int, **kwargs: Any) -> nn.Module:
    return _sync_cls()(num_channels, **kwargs)


def _simple(name: str) -> Callable[..., nn.Module]:
    def build(num_channels: int, **kwargs: Any) -> nn.Module:
        return _layer(name)()(num_channels, **kwargs)

    build.__name__ = f"build_{name}"
    return build


def _gn_signature() -> Callable[..., Any]:
    def gn_signature(
        num_channels: int,
        num_groups: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None: ...

    return gn_signature


def _register_builtins() -> None:
    builtins = [
        NormEntry(
            "bn",
            _build_bn,
            aliases=("batch", "batchnorm", "batch_norm", "bn1d", "bn2d", "bn3d"),
            batch_stats=True,
            takes_dims=True,
            signature=lambda: _BN(2),
        ),
        NormEntry(
            "gn",
            _build_gn,
            aliases=("group", "groupnorm", "group_norm"),
            arg="num_groups",
            signature=_gn_signature,
            check=_check_gn,
        ),
        NormEntry(
            "ln",
            _build_ln,
            aliases=("layer", "layernorm", "layer_norm", "ln2d", "layernorm2d"),
            takes_dims=True,
            dims=(1, 2),
            signature=_ln_signature,
        ),
        NormEntry(
            "in",
            _build_in,
            aliases=("instance", "instancenorm", "instance_norm"),
            takes_dims=True,
            signature=lambda: _IN(2),
        ),
        NormEntry(
            "frozen_bn",
            _simple("FrozenBatchNorm2d"),
            aliases=("frozen", "frozen_batchnorm", "frozenbatchnorm2d", "fbn"),
            dims=(2,),
            signature=_layer("FrozenBatchNorm2d"),
        ),
        NormEntry(
            "brn",
            _simple("BatchRenorm2d"),
            aliases=("batch_renorm", "batchrenorm", "renorm", "batchrenorm2d"),
            batch_stats=True,
            dims=(2,),
            signature=_layer("BatchRenorm2d"),
            check=_check_brn,
        ),
        NormEntry(
            "ghost_bn",
            _simple("GhostBatchNorm2d"),
            aliases=("ghost", "gbn", "ghost_batchnorm", "ghostbatchnorm2d"),
            batch_stats=True,
            arg="virtual_batch_size",
            dims=(2,),
            signature=_layer("GhostBatchNorm2d"),
            check=_check_ghost,
        ),
        NormEntry(
            "sync_bn",
            _build_sync,
            aliases=("sync", "syncbn", "sync_batchnorm", "syncbatchnorm"),
            batch_stats=True,
            signature=_sync_signature,
        ),
        NormEntry(
            "l2",
            _simple("L2Norm"),
            aliases=("l2norm", "l2_norm"),
            arg="scale",
            signature=_layer("L2Norm"),
            check=_check_l2,
        ),
        NormEntry(
            "rms",
            _build_rms,
            aliases=("rmsnorm", "rms_norm"),
            takes_dims=True,
            dims=(1, 2),
            signature=_rms_signature,
        ),
        NormEntry(
            "rms2d",
            _simple("RMSNorm2d"),
            aliases=("rmsnorm2d", "rms_norm2d"),
            dims=(2,),
            signature=_layer("RMSNorm2d"),
        ),
        NormEntry(
            "lrn",
            _build_lrn,
            aliases=("local_response_norm", "localresponsenorm"),
            arg="size",
            dims=(2, 3),
            signature=_lrn_signature,
            check=_check_lrn,
        ),
        NormEntry(
            "frn",
            _simple("FilterResponseNorm2d"),
            aliases=("filter_response_norm", "filterresponsenorm2d", "frn_tlu"),
            dims=(2,),
            signature=_layer("FilterResponseNorm2d"),
        ),
        NormEntry(
            "evo_b0",
            _simple("EvoNorm2dB0"),
            aliases=("evonorm_b0", "evonorm2db0"),
            batch_stats=True,
            dims=(2,),
            signature=_layer("EvoNorm2dB0"),
        ),
        NormEntry(
            "evo_s0",
            _build_evo_s0,
            aliases=("evonorm_s0", "evonorm2ds0"),
            arg="num_groups",
            dims=(2,),
            signature=_evo_s0_signature,
            check=_check_evo_s0,
        ),
        NormEntry(
            "split_bn",
            _simple("SplitBatchNorm2d"),
            aliases=("splitbn", "split_batchnorm", "splitbatchnorm2d", "aux_bn"),
            batch_stats=True,
            arg="num_splits",
            dims=(2,),
            signature=_layer("SplitBatchNorm2d"),
            check=_check_split,
        ),
        NormEntry(
            "none",
            _simple("Identity"),
            aliases=("identity", "id", "no", "null"),
            signature=_layer("Identity"),
        ),
    ]
    for entry in builtins:
        _add(entry)


_register_builtins()
