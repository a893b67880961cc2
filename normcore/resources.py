"""How much memory a job will need, estimated from its spec without allocating it.

Three parts, each per training process (``resources.gpus`` processes under data parallel, and
each one loads the data set and holds a model):

- data: the data set in memory, the reader's raw arrays and the float32 train and val tensors
  built from them (``normcore.data.check.DataInfo.memory_bytes``), learned from headers only;
- model: parameters, their gradients and the optimizer's state, float32 (SGD with momentum
  keeps one buffer per parameter, AdamW two: ``exp_avg`` and ``exp_avg_sq``);
- activations: what autograd keeps for the backward pass at ``data.batch_size``, taken as the
  sum of every leaf module's output plus the input batch, float32 (counted on the meta device,
  so nothing is allocated and no real model is built).

The estimate leaves out the Python and torch runtime itself (a few hundred MB per process) and
the allocator's slack; a budget should leave room for them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normcore.data.check import DataCheckError, DataInfo, describe_data
from normcore.factory import parse_norm
from normcore.models.size import count_parameters
from normcore.spec import JobSpec, ModelSpec

FLOAT32_BYTES = 4
MB = 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """A job's estimated memory in bytes: ``data`` + ``model`` + ``activations`` per process."""

    data_bytes: int
    model_bytes: int
    activation_bytes: int
    parameters: int
    processes: int = 1

    @property
    def per_process_bytes(self) -> int:
        """Data, model and activations of one training process."""
        return self.data_bytes + self.model_bytes + self.activation_bytes

    @property
    def total_bytes(self) -> int:
        """All processes together."""
        return self.per_process_bytes * self.processes

    def as_mb(self) -> dict[str, float]:
        """Each part and the total in MiB (2**20 bytes), rounded to 0.1, for messages and JSON."""
        return {
            "data_mb": round(self.data_bytes / MB, 1),
            "model_mb": round(self.model_bytes / MB, 1),
            "activations_mb": round(self.activation_bytes / MB, 1),
            "total_mb": round(self.total_bytes / MB, 1),
        }


def optimizer_slots(spec: JobSpec) -> int:
    """Buffers the optimizer keeps per parameter: AdamW 2, SGD 1 with momentum, else 0."""
    if spec.optim.name == "adamw":
        return 2
    return 1 if spec.optim.momentum > 0 else 0


def _activation_elements(model: nn.Module, x: torch.Tensor) -> int:
    """Sum of the output elements of every leaf module in one forward of ``x`` (meta tensors)."""
    total = 0

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        outputs = output if isinstance(output, tuple | list) else (output,)
        total += sum(o.numel() for o in outputs if isinstance(o, torch.Tensor))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not any(m.children())]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return total


@functools.lru_cache(maxsize=256)
def _model_shape_counts(
    model_json: str, batch: int, in_channels: int, h: int, w: int
) -> tuple[int, int]:
    """(parameters, activation elements) of a model spec on a batch of (h, w) images.

    One meta-device build and forward at the batch size itself (split and ghost norms depend on
    it). Cached: the same architecture and batch are submitted again and again.
    """
    from normcore.models import build_model
    from normcore.spec import ModelSpec

    spec = ModelSpec.model_validate_json(model_json)
    with torch.device("meta"):
        model = build_model(spec, in_channels=in_channels)
    params = sum(p.numel() for p in model.parameters())
    x = torch.empty(batch, in_channels, h, w, device="meta")
    return params, _activation_elements(model.train(), x)


def _shape_stand_in(model: ModelSpec) -> ModelSpec:
    """``model`` with a SplitBatchNorm swapped for a BatchNorm, for counting activations only.

    A split BN's output has its input's shape, like a BN's, but its meta-device build and forward
    cost seconds at the widths the parameter limit allows (K BatchNorms per layer), which the API
    process must not spend on every submit. Its parameters are counted from the spec instead.
    """
    parsed = parse_norm(model.norm)
    if getattr(parsed.entry, "name", None) != "split_bn":
        return model
    return model.model_copy(update={"norm": "bn"})


def model_memory(spec: JobSpec, info: DataInfo) -> tuple[int, int, int]:
    """(parameters, model bytes, activation bytes) for ``spec`` on data shaped like ``info``.

    Builds the model and runs one forward on the meta device: shapes only, no memory.

    Raises:
        DataCheckError: the model cannot take images of ``info.image_size`` (loc
            ("data", "image_size")), or the builder refuses the model spec (loc ("model",)).
    """
    in_channels = spec.model.in_channels or info.channels
    h, w = info.image_size
    try:
        model_spec = _shape_stand_in(spec.model)
        params, elements = _model_shape_counts(
            model_spec.model_dump_json(), spec.data.batch_size, in_channels, h, w
        )
        if model_spec is not spec.model:
            params = count_parameters(spec.model, in_channels=in_channels)
    except ValueError as exc:
        raise DataCheckError(("model",), str(exc)) from None
    except RuntimeError as exc:
        raise DataCheckError(
            ("data", "image_size"),
            f"{spec.model.arch} cannot take {h}x{w} images: {str(exc).splitlines()[0]}; "
            "set data.image_size larger",
        ) from None
    model_bytes = params * FLOAT32_BYTES * (2 + optimizer_slots(spec))
    activations = elements + spec.data.batch_size * in_channels * h * w  # + the input batch
    return params, model_bytes, activations * FLOAT32_BYTES


def estimate_memory(
    spec: JobSpec | dict[str, Any],
    data_root: str | Path | None = None,
    *,
    info: DataInfo | None = None,
) -> MemoryEstimate:
    """Estimate the memory ``spec`` trains with; see the module docstring for the parts.

    ``info`` is the data set as ``normcore.data.check.describe_data`` (or ``check_data``) saw
    it; without it, it is read from headers under ``data_root``.

    Raises:
        DataCheckError: the data set cannot be described or the model does not fit it.
    """
    spec = spec if isinstance(spec, JobSpec) else JobSpec.model_validate(spec)
    info = info if info is not None else describe_data(spec, data_root)
    params, model_bytes, activation_bytes = model_memory(spec, info)
    return MemoryEstimate(
        data_bytes=info.memory_bytes,
        model_bytes=model_bytes,
        activation_bytes=activation_bytes,
        parameters=params,
        processes=max(1, spec.resources.gpus),
    )


def over_budget_message(estimate: MemoryEstimate, budget_bytes: int) -> str:
    """The refusal a user reads when ``estimate`` exceeds ``budget_bytes``, with every part in MB."""
    mb = estimate.as_mb()
    procs = f" x {estimate.processes} processes" if estimate.processes > 1 else ""
    return (
        f"the job needs about {mb['total_mb']:.1f} MB (data {mb['data_mb']:.1f} MB + model, "
        f"gradients and optimizer state {mb['model_mb']:.1f} MB + activations at batch size "
        f"{mb['activations_mb']:.1f} MB{procs}) and this server's budget per job is "
        f"{budget_bytes / MB:.1f} MB: lower data.num_samples, data.image_size, data.batch_size "
        "or model.width"
    )
