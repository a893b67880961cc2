"""A sweep request and its expansion: grid cells, dotted overrides, seeds, the LR scaling rule.

A sweep is a base job spec, a grid over spec fields named by dotted path
(``{"model.norm": ["bn", "gn:4"], "data.batch_size": [2, 32]}``) and a list of seeds. Its cells
are the grid's cartesian product in row-major order (the last axis varies fastest); its runs
are cells x seeds, numbered seed-major (run = seed_index * cells + cell), so the first runs
released cover every cell once before any cell gets its second seed.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from normcore.spec import NAME_PATTERN, JobSpec, OptimSpec

MAX_AXES = 4
MAX_VALUES = 64
# Every cell runs the submit checks (a memory estimate on the meta device: 0.05-0.4 s) at submit.
MAX_CELLS = 64
MAX_RUNS = 512
MAX_SEEDS = 32
DOTTED = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*){0,3}$")
METRIC = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Fields a grid may not set: the seed comes from ``seeds``, the name is made per run.
RESERVED = ("seed", "name")

GridValue = str | int | float | bool | None | dict[str, Any]


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The model class a field holds, or None where it may hold anything else (a dict, a str)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def spec_fields(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[str]:
    """Every dotted field name of ``model`` and its nested models ("model", "model.norm", ...)."""
    names: list[str] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        names.append(dotted)
        sub = _submodel(field.annotation)
        if sub is not None:
            names.extend(spec_fields(sub, f"{dotted}."))
    return names


def unknown_key_message(key: str) -> str | None:
    """A message naming ``key`` when its path leaves JobSpec's fields, with the close valid
    names (difflib.get_close_matches); None when the key is a field or lies inside a field that
    takes free-form values (a norm given as a dict)."""
    model: type[BaseModel] | None = JobSpec
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if model is None:
            return None
        field = model.model_fields.get(part)
        if field is None:
            known = spec_fields()
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            if not close:
                head = ".".join(parts[:depth])
                level = [n for n in known if n.count(".") == depth and n.startswith(head)]
                close = difflib.get_close_matches(part, [n.split(".")[-1] for n in level], n=3)
                close = [f"{head}.{c}" if head else c for c in close]
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            return f"unknown field {key!r} in the grid: no spec field {part!r}{hint}"
        model = _submodel(field.annotation)
    return None


class LrRule(BaseModel):
    """The linear scaling rule (Goyal et al. 2017, arXiv 1706.02677, section 2.1):
    ``optim.lr = lr * data.batch_size / reference_batch``, with ``lr`` the cell's own
    ``optim.lr`` (the base spec's unless the grid sets it)."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["linear"] = "linear"
    reference_batch: int = Field(ge=1, le=4096, description="The batch size the lr is given for.")


class SweepRequest(BaseModel):
    """What ``POST /sweeps`` takes (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="sweep", min_length=1, max_length=120, pattern=NAME_PATTERN)
    base: dict[str, Any] = Field(description="A job spec, as POST /jobs takes it.")
    grid: dict[str, Annotated[list[GridValue], Field(min_length=1, max_length=MAX_VALUES)]] = Field(
        min_length=1,
        max_length=MAX_AXES,
        description="Spec fields by dotted name, each with the values to try.",
    )
    seeds: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(
        default_factory=lambda: [0], min_length=1, max_length=MAX_SEEDS
    )
    metric: str = Field(
        default="val_accuracy",
        pattern=METRIC.pattern,
        description="A key of the jobs' per-epoch val rows: val_accuracy, val_loss, "
        "train_accuracy, train_loss (classification); val_psnr, val_loss, train_psnr, "
        "train_loss (super-resolution). Another name is a 422 at submit.",
    )
    direction: Literal["max", "min"] = "max"
    concurrency: int = Field(
        default=4, ge=1, le=64, description="At most this many runs queued or running at once."
    )
    lr_rule: LrRule | None = None

    @field_validator("grid")
    @classmethod
    def _check_grid(cls, grid: dict[str, list[GridValue]]) -> dict[str, list[GridValue]]:
        for key, values in grid.items():
            if not DOTTED.match(key):
                raise ValueError(
                    f"grid key {key!r} is not a dotted spec field such as 'model.norm'"
                )
            if key.split(".")[0] in RESERVED:
                raise ValueError(f"grid key {key!r}: set seeds with 'seeds', not in the grid")
            unknown = unknown_key_message(key)
            if unknown is not None:
                raise ValueError(unknown)
            canon = [json.dumps(v, sort_keys=True) for v in values]
            if len(set(canon)) != len(canon):
                raise ValueError(f"grid key {key!r} lists a value twice")
        return grid

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds lists a seed twice")
        return seeds

    @model_validator(mode="after")
    def _check_size(self) -> SweepRequest:
        cells = 1
        for values in self.grid.values():
            cells *= len(values)
        if cells > MAX_CELLS:
            raise ValueError(f"the grid has {cells} cells; the limit is {MAX_CELLS}")
        runs = cells * len(self.seeds)
        if runs > MAX_RUNS:
            raise ValueError(f"the sweep has {runs} runs (cells x seeds); the limit is {MAX_RUNS}")
        if self.lr_rule is not None and "data.batch_size" not in self.grid:
            raise ValueError("lr_rule scales by data.batch_size, which the grid does not sweep")
        return self

    @property
    def axes(self) -> list[str]:
        """The grid's dotted names, in request order."""
        return list(self.grid)

    def cells(self) -> list[dict[str, Any]]:
        """Each cell's values ({dotted name: value}), row-major over the grid."""
        return [dict(zip(self.axes, combo, strict=True)) for combo in self.product()]

    def product(self) -> list[tuple[Any, ...]]:
        """The grid's cartesian product, row-major."""
        return list(itertools.product(*self.grid.values()))

    @property
    def runs(self) -> int:
        """Cells x seeds."""
        return len(self.product()) * len(self.seeds)

    def request_hash(self) -> str:
        """sha256 of the canonical JSON of the request: the Idempotency-Key request hash."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Run:
    """One run: its number, its cell's number and values, its seed."""

    run: int
    cell: int
    seed: int
    values: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """The ``sweep_cell`` stored with the run's job."""
        return {"run": self.run, "cell": self.cell, "seed": self.seed, "values": self.values}


def run_of(request: SweepRequest, run: int) -> Run:
    """Run number ``run`` (seed-major: run = seed_index * cells + cell). Raises IndexError."""
    cells = request.cells()
    if not 0 <= run < len(cells) * len(request.seeds):
        raise IndexError(f"run {run} out of range")
    seed_index, cell = divmod(run, len(cells))
    return Run(run, cell, request.seeds[seed_index], cells[cell])


def set_dotted(spec: dict[str, Any], key: str, value: Any) -> None:
    """Set ``spec[a][b][c] = value`` for ``key`` "a.b.c", making missing levels as dicts.

    Raises ValueError when a level on the way is present but not an object.
    """
    parts = key.split(".")
    node = spec
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{key!r}: {part!r} is not an object in the base spec")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def cell_label(values: dict[str, Any]) -> str:
    """A short human label of a cell: "model.norm=bn, data.batch_size=2"."""
    return ", ".join(
        f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items()
    )


def spec_dict(request: SweepRequest, run: Run) -> dict[str, Any]:
    """The job spec dict of a run: the base, the cell's overrides, its seed, its name and, with
    the linear rule, ``optim.lr = lr * batch / reference_batch`` (Goyal et al. 2017)."""
    spec = copy.deepcopy(request.base)
    for key, value in run.values.items():
        set_dotted(spec, key, value)
    spec["seed"] = run.seed
    spec["name"] = f"{request.name}-c{run.cell}-s{run.seed}"
    if request.lr_rule is not None:
        optim = spec.setdefault("optim", {})
        if not isinstance(optim, dict):
            raise ValueError("optim is not an object in the base spec")
        data = spec.get("data") or {}
        lr = optim.get("lr", OptimSpec().lr)
        batch = data.get("batch_size") if isinstance(data, dict) else None
        if isinstance(lr, int | float) and isinstance(batch, int):
            optim["lr"] = float(lr) * batch / request.lr_rule.reference_batch
    return spec


def recorded_metrics(spec: JobSpec) -> list[str]:
    """The keys of the per-epoch "val" rows a job of ``spec`` writes (what a sweep's ``metric``
    may name): ``normcore.engine.epoch_metric_names`` of its task."""
    from normcore.engine import epoch_metric_names  # torch: imported once a spec is checked

    return epoch_metric_names(spec.task)


def build_spec(request: SweepRequest, run: Run) -> JobSpec:
    """The validated JobSpec of a run. Raises ValueError or pydantic's ValidationError."""
    return JobSpec.model_validate(spec_dict(request, run))
