"""What lets torch's tools see normcore's norm layers the way they see torch.nn's.

**torch.fx.** ``symbolic_trace`` records every module under ``torch.nn`` as a ``call_module`` leaf
and traces through every other one. normcore's layers check shapes and pick a kernel by memory
layout in Python, which fx's proxies cannot answer (``if input.dim() ...`` on a proxy is a
``TraceError``), so every norm layer's forward starts with::

    if type(input) is not Tensor and isinstance(input, Proxy):
        return fx_leaf(self, input, self._forward_script)

and becomes a ``call_module`` node, as its torch.nn twin does. The traced ``GraphModule`` calls the
real layer: the same checks, kernels, small-batch policy and buffer updates as in eager mode.
``torch.fx.experimental.optimization.fuse`` and other graph passes see the same node kinds they
see for torch.nn (they match torch's classes by exact type, so they leave normcore's alone).
A layer traced on its own (it is the root, no parent can hold the node) is traced through its
TorchScript forward where it has one (torch.nn's computation, as torch.nn's layers trace).

**TorchScript.** ``torch.jit.script`` compiles ``forward`` and what it calls; the twins' forwards
start with ``if torch.jit.is_scripting(): return self._forward_script(input)``, which TorchScript
evaluates statically, compiling only ``_forward_script``: torch.nn's forward written with the
same attributes (the layer's state is shared, its outputs are torch.nn's). In eager mode both
checks cost a few hundred nanoseconds per call.

**torch.export / dynamo / ONNX** trace the eager forward with fake tensors (no proxy reaches it);
the channel-dim fast paths step aside while compiling (``torch.compiler.is_compiling``).

**torch.func** (``vmap``, ``grad``, ...): the fast paths written as ``autograd.Function`` step
aside under a functorch transform (``functorch_active``) for torch's plain ops, and memory
layouts are not queried there (``vmap`` cannot answer ``is_contiguous(channels_last)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx, nn

__all__ = ["Proxy", "Tensor", "functorch_active", "fx_leaf"]

Proxy = fx.Proxy

# True inside torch.func.vmap, grad, jvp, ...: custom autograd.Functions without a vmap rule and
# memory-format queries fail there
functorch_active = torch._C._are_functorch_transforms_active


def fx_leaf(module: nn.Module, input: Proxy, plain: Callable[[Any], Any] | None = None) -> Any:
    """Record ``module(input)`` as a ``call_module`` node of the graph being traced.

    When ``module`` is the root being traced, or is not registered under it, there is no path to
    call it by: ``plain`` (torch.nn's computation, written with static control flow only, e.g.
    the layer's TorchScript forward) is traced instead, as fx traces torch.nn's layers; without
    one, or for a batch norm in training mode (its batch count would be counted at trace time),
    a ``TraceError`` says to trace a model that holds the layer.
    """
    tracer = input.tracer
    path: str | None
    try:
        path = tracer.path_of_module(module)
    except NameError:  # a layer held outside the module tree (a plain list, a closure)
        path = None
    if path and module is not getattr(tracer, "root", None):
        return tracer.create_proxy("call_module", path, (input,), {})
    name = type(module).__name__
    if plain is None:
        raise fx.proxy.TraceError(
            f"torch.fx cannot trace normcore's {name} on its own (it is the root being traced, "
            "or not registered in it): its forward branches on the input's shape and layout. "
            f"Trace a model that holds it as a submodule, e.g. nn.Sequential({name}(...)), where "
            "it becomes a call_module node as torch.nn's layers do."
        )
    if (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.training
        and module.track_running_stats
    ):
        raise fx.proxy.TraceError(
            f"torch.fx cannot trace normcore's {name} on its own in training mode: its batch "
            "count (num_batches_tracked) would be counted at trace time, not when it runs. "
            "Trace a model that holds it (it becomes a call_module node, which updates all its "
            "buffers when run), or call .eval() first."
        )
    return plain(input)
