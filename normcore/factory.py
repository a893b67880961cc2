"""The norm factory: build a normalization layer from a short spec; register your own kinds.

The names, builders and argument checks live in ``normcore.registry`` (one ``NormKind`` per
name); ``register_norm`` adds a kind there, where the conversions, folding and statistics find
it too.

A spec is one of

- a name: ``"bn"``, ``"gn"``, ``"ln"``, ``"in"``, ``"frozen_bn"``, ``"brn"``, ``"ghost_bn"``,
  ``"sync_bn"``, ``"l2"``, ``"rms"``, ``"rms2d"``, ``"lrn"``, ``"frn"``, ``"evo_b0"``,
  ``"evo_s0"``, ``"split_bn"``, ``"none"`` (or an alias such as ``"batch"``, ``"group_norm"``);
  case, ``_`` and ``-`` do not matter;
- a name with its main argument after a colon: ``"gn:8"`` (8 groups), ``"ghost_bn:16"``
  (virtual batch size), ``"l2:10"`` (initial scale), ``"evo_s0:8"`` (groups), ``"split_bn:3"``
  (splits), ``"lrn:5"`` (window size);
- a name with keyword arguments: ``"bn(momentum=0.01, eps=1e-3)"``, ``"gn:8(eps=1e-6)"``;
  values are Python literals, parsed with ``ast.literal_eval`` (nothing is evaluated); a string
  spec is at most ``MAX_SPEC_LENGTH`` (256) characters, with at most 8 levels of brackets or
  unary operators in a row, checked before it is parsed;
- a dict: ``{"type": "batch", "momentum": 0.01}`` (``"name"`` works as well as ``"type"``);
- a class or a callable called as ``spec(num_channels, **kwargs)``; ``None`` means ``"none"``.

Every mistake raises ``ValueError`` with the valid choices, at the point of the mistake.

Momentum follows torch's convention (``running = (1 - m) * running + m * batch``). The keyword
``momentum_convention="keras"`` (to ``make_norm``, or inside a spec) reads ``momentum`` the
Keras way (``moving = m * moving + (1 - m) * batch``), so Keras' 0.99 becomes 0.01 here.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from normcore import registry
from normcore.registry import DEFAULT_GROUPS, NormKind, available_norms

__all__ = [
    "DEFAULT_GROUPS",
    "MAX_SPEC_LENGTH",
    "NormEntry",
    "NormKind",
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

# A norm spec is a name and a few arguments; these bounds are checked before anything parses it,
# so a hostile spec (a job spec is user input) fails with a ValueError, never a RecursionError
# or MemoryError inside ast.
MAX_SPEC_LENGTH = 256  # characters of a string spec
MAX_SPEC_NESTING = 8  # brackets inside one another, and unary operators in a row (-+-1)
MAX_SPEC_NODES = 100  # syntax-tree nodes of its arguments

NormEntry = NormKind  # the name this class had before the registry was its own module
_REGISTRY = registry._REGISTRY  # the table itself (tests snapshot and restore it)
_LOOKUP = registry._LOOKUP


def register_norm(
    name: str,
    *,
    aliases: Iterable[str] = (),
    batch_stats: bool = False,
    arg: str | None = None,
    override: bool = False,
    classes: Iterable[type[nn.Module]] | Mapping[type[nn.Module], int | None] | None = None,
    family: str | None = None,
    foldable: bool = False,
    syncable: bool = False,
    recalibratable: bool = False,
    dims: Iterable[int] = (1, 2, 3),
) -> Callable[[T], T]:
    """Decorator registering a norm class or factory function under ``name`` (and aliases).

    The decorated object is called as ``obj(num_channels, **kwargs)`` (plus ``dims=`` if it
    takes a ``dims`` parameter). The new kind joins the one table (``normcore.registry``) that
    make_norm, the conversions, folding, syncing and statistics read:

    Args:
        name: the canonical name (letters, digits, ``_``, ``-``); ``aliases`` are other names.
        batch_stats: it normalizes with batch statistics in training (no batches of one sample).
        arg: the keyword that ``"name:value"`` sets.
        override: replace an existing kind of that name.
        classes: the layer classes of the kind (a decorated class by default), or a mapping of
            each to the input dims it is built for (None: any). ``convert_norm`` converts
            layers of these classes and ``norm_stats`` reports them; a subclass of a torch.nn
            norm that is not registered is left alone by the conversions.
        family: ``"batch"`` or ``"instance"`` (derived from the classes' torch.nn bases by
            default) lets ``convert_norm`` carry momentum and track_running_stats.
        foldable: its eval forward is BatchNorm's, so ``fuse_conv_bn`` folds it.
        syncable: ``convert_sync_norm`` turns it into SyncBatchNorm (it has BatchNorm's
            attributes).
        recalibratable: ``recalibrate_bn`` recomputes its running statistics (BatchNorm's
            buffers, and ``momentum=None`` is the cumulative average).
        dims: the input dims make_norm may build it for.
    """
    if not name or not re.fullmatch(r"[A-Za-z][\w\-]*", name):
        raise ValueError(f"norm name must be letters, digits, '_' or '-', got {name!r}")
    dims = tuple(dims)
    if not dims or any(d not in (1, 2, 3) for d in dims):
        raise ValueError(f"register_norm({name!r}): dims must be some of 1, 2, 3, got {dims!r}")

    def decorate(obj: T) -> T:
        if not callable(obj):
            raise ValueError(f"register_norm({name!r}) needs a class or a function, got {obj!r}")
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        if classes is None:
            layer_classes: dict[type[nn.Module], int | None] = (
                {obj: None} if isinstance(obj, type) else {}
            )
        elif isinstance(classes, Mapping):
            layer_classes = dict(classes)
        else:
            layer_classes = dict.fromkeys(classes)
        bad = [c for c in layer_classes if not (isinstance(c, type) and issubclass(c, nn.Module))]
        if bad:
            raise ValueError(f"register_norm({name!r}): classes must be nn.Module classes: {bad}")
        wanted = [
            flag
            for flag, on in (
                ("foldable", foldable),
                ("syncable", syncable),
                ("recalibratable", recalibratable),
            )
            if on
        ]
        if wanted and not layer_classes:
            raise ValueError(
                f"register_norm({name!r}): {', '.join(wanted)} describes layers, so name their "
                "classes: classes=(MyNorm,)"
            )
        registry.add_kind(
            NormKind(
                name=name,
                builder=obj,  # type: ignore[arg-type]
                aliases=tuple(aliases),
                classes=layer_classes,
                family=family or registry.default_family(layer_classes) or name,
                batch_stats=batch_stats,
                foldable=foldable,
                syncable=syncable,
                recalibratable=recalibratable,
                dims=dims,
                arg=arg,
                takes_dims="dims" in params,
                signature=lambda: obj,  # type: ignore[return-value]
            ),
            override=override,
        )
        return obj

    return decorate


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


def _check_spec_size(spec: str) -> None:
    """Refuse a spec too long or too deeply nested to be a norm spec, before parsing it.

    Python's parser and ``ast.literal_eval`` recurse once per nesting level, so a few thousand
    ``(`` or ``-`` in a row end in a RecursionError (or a MemoryError) instead of a message.
    """
    if len(spec) > MAX_SPEC_LENGTH:
        raise ValueError(
            f"norm spec is {len(spec)} characters long; at most {MAX_SPEC_LENGTH} are accepted "
            f"(a name and a few arguments, e.g. 'bn(momentum=0.01, eps=1e-3)'): {spec[:40]!r}..."
        )
    depth = deepest = run = longest = 0
    for ch in spec:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth -= 1
        if ch in "+-~":
            run += 1
            longest = max(longest, run)
        elif not ch.isspace():
            run = 0
    # the name's own "(...)" is one level
    if deepest > MAX_SPEC_NESTING + 1 or longest > MAX_SPEC_NESTING:
        what = "brackets" if deepest > MAX_SPEC_NESTING + 1 else "unary operators in a row"
        raise ValueError(
            f"norm spec {_short(spec)} nests {max(deepest - 1, longest)} {what}; at most "
            f"{MAX_SPEC_NESTING} are accepted: write each value as a plain literal, e.g. "
            "'bn(momentum=0.01, eps=1e-3)'"
        )


def _short(spec: str) -> str:
    return repr(spec) if len(spec) <= 60 else repr(spec[:57]) + "..."


def _safe_literal_eval(node_or_text: Any) -> Any:
    """``ast.literal_eval`` whose deep-recursion failures read as a ValueError."""
    try:
        return ast.literal_eval(node_or_text)
    except (RecursionError, MemoryError):
        raise ValueError("value nests too deeply") from None


def _literal(text: str, where: str) -> Any:
    try:
        return _safe_literal_eval(text.strip())
    except (ValueError, SyntaxError):
        stripped = text.strip()
        if re.fullmatch(r"[A-Za-z_]\w*", stripped):
            return stripped  # bare word, e.g. gn:auto is a string
        raise ValueError(f"{where}: cannot read {stripped!r} as a value") from None


def _parse_call_args(args: str, spec: str) -> tuple[list[Any], dict[str, Any]]:
    try:
        tree = ast.parse(f"f({args})", mode="eval")
    except (SyntaxError, RecursionError, MemoryError):
        raise ValueError(
            f"cannot parse the arguments of norm spec {spec!r}; write them as "
            "name(key=value, ...), e.g. 'bn(momentum=0.01, eps=1e-3)'"
        ) from None
    nodes = sum(1 for _ in ast.walk(tree))
    if nodes > MAX_SPEC_NODES:
        raise ValueError(
            f"norm spec {_short(spec)} has {nodes} syntax nodes in its arguments; at most "
            f"{MAX_SPEC_NODES} are accepted (a few keyword arguments with literal values)"
        )
    call = tree.body
    assert isinstance(call, ast.Call)
    positional = []
    kwargs: dict[str, Any] = {}
    for node in call.args:
        try:
            positional.append(_safe_literal_eval(node))
        except ValueError:
            raise ValueError(
                f"norm spec {spec!r}: argument {ast.unparse(node)!r} is not a literal"
            ) from None
    for kw in call.keywords:
        if kw.arg is None:
            raise ValueError(f"norm spec {spec!r}: '**' is not allowed")
        try:
            kwargs[kw.arg] = _safe_literal_eval(kw.value)
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
    return registry.get_kind(name)


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
        _check_spec_size(spec)
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

    Such a norm cannot train on batches of one sample. An unregistered class counts when its
    nearest registered base does (a subclass of a torch or normcore BatchNorm: yes;
    FrozenBatchNorm2d: no).
    """
    parsed = parse_norm(spec)
    if parsed.entry is not None:
        return parsed.entry.batch_stats
    target = parsed.target
    if isinstance(target, functools.partial):
        target = target.func
    if isinstance(target, type):
        kind = registry.kind_of(target, exact=False)
        return kind is not None and kind.batch_stats
    return False
