"""torch.compile(fullgraph=True) of small nets with each norm: no graph break, eager numerics.

Each case compiles a conv -> norm -> ReLU -> conv net with inductor (the default backend), trains
it 3 SGD steps next to an eager twin, and compares outputs, parameters and running buffers.
Compiling is the slow part (several seconds per net on CPU), so the nets are tiny.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from torch import nn

import normcore.layers as L

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin on a busy 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


NORMS: dict[str, Callable[[], nn.Module]] = {
    "bn-momentum-None": lambda: L.BatchNorm2d(4, momentum=None),
    "gn": lambda: L.GroupNorm(2, 4),
    "layernorm2d": lambda: L.LayerNorm2d(4),
    "rmsnorm2d": lambda: L.RMSNorm2d(4),
    "frozen-bn": lambda: L.FrozenBatchNorm2d(4),
    "ghost-bn": lambda: L.GhostBatchNorm2d(4, virtual_batch_size=3),
    "batch-renorm": lambda: L.BatchRenorm2d(4, warmup_start=1, warmup_steps=2),
}


def _net(norm: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), norm(), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.Flatten()
    )
    with torch.no_grad():  # statistics away from their defaults, so a frozen BN matters
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.uniform_(-0.5, 0.5)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("name", list(NORMS))
def test_compiled_fullgraph_matches_eager_after_three_train_steps(name: str) -> None:
    eager = _net(NORMS[name])
    model = copy.deepcopy(eager)
    probe = copy.deepcopy(eager)
    x = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(1))

    explained = torch._dynamo.explain(probe)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    compiled = torch.compile(model, fullgraph=True)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        xs = x + step
        y_e, y_c = eager(xs), compiled(xs)
        torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-5, msg=f"step {step} output")
        for opt, y in ((opt_e, y_e), (opt_c, y_c)):
            opt.zero_grad()
            y.square().mean().backward()
            opt.step()
    for (n, p_e), p_c in zip(eager.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p_c, p_e, atol=1e-5, rtol=1e-5, msg=n)
    buffers = dict(model.named_buffers())
    for n, b_e in eager.named_buffers():
        if b_e.dtype == torch.long:
            assert torch.equal(buffers[n], b_e), n
        else:
            torch.testing.assert_close(buffers[n], b_e, atol=1e-6, rtol=1e-5, msg=n)
    if name == "bn-momentum-None":
        assert int(model[1].num_batches_tracked) == 3
    torch._dynamo.reset()
