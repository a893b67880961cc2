"""The job spec: what a user sends to train one normalized CNN, as pydantic models.

A spec is plain JSON (or YAML) shaped as in DESIGN.md. Every field has a sane default except the
model architecture and the dataset, and every bad value is refused with a message that says
what to change. ``JobSpec.model_json_schema()`` is the reference the README is generated from.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from normcore.specfile import read_spec

# A path component longer than this is refused by Linux (NAME_MAX) and by most file systems.
MAX_PATH_COMPONENT_BYTES = 255
# Values a generated data set may hold (samples x channels x side^2): 2**28 floats = 1 GiB.
MAX_GENERATED_VALUES = 2**28
# Defaults of the generated sets (normcore.data.loader): (channels, image side).
GENERATED_DEFAULTS = {"synthetic": (3, 16), "brightness": (1, 16), "sr-synthetic": (3, 32)}
GENERATED_DEFAULT_SAMPLES = 1024

ARCHS = ("convblock", "lenet", "vgg11", "resnet20", "resnet18", "edsr")
DATASETS = (
    "synthetic",
    "brightness",
    "digits",
    "sr-synthetic",
    "mnist",
    "cifar10",
    "imagefolder",
    "npz",
)
FILE_DATASETS = ("mnist", "cifar10", "imagefolder", "npz")
SR_ARCHS = ("edsr",)
# archs whose first conv honours model.stem_padding (normcore.models.TAKES_STEM_PADDING)
STEM_PADDING_ARCHS = ("lenet", "resnet20", "resnet18")
SR_DATASETS = ("sr-synthetic",)
# a year: max_runtime's schema bound; a server's own cap is usually far lower
MAX_RUNTIME_MINUTES = 525_600.0

NormChoice = str | dict[str, Any]

# DESIGN.md's "A job spec, as a user writes it": the OpenAPI example and the tests' reference.
EXAMPLE_SPEC: dict[str, Any] = {
    "name": "resnet20-gn-digits",
    "model": {"arch": "resnet20", "norm": "gn:8", "num_classes": 10, "dropout": 0.0},
    "data": {"dataset": "digits", "batch_size": 32, "val_fraction": 0.2},
    "optim": {
        "name": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "cosine",
    },
    "epochs": 10,
    "seed": 0,
    "resources": {"device": "auto", "gpus": 1, "amp": "bf16"},
    "checkpoint": {"every_epochs": 1, "keep_last": 3, "precise_bn_batches": 0},
}


class _Strict(BaseModel):
    """Base for spec sections: unknown keys are errors, so a typo never passes silently."""

    # allow_inf_nan=False: NaN and Infinity (which Python's JSON parser accepts) are refused.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSpec(_Strict):
    """Which network to build and how it is normalized."""

    arch: Literal["convblock", "lenet", "vgg11", "resnet20", "resnet18", "edsr"] = Field(
        description="Network architecture."
    )
    norm: NormChoice = Field(
        default="bn",
        description='Normalization, any name make_norm accepts: "bn", "gn:8", "ln", "in", '
        '"frozen_bn", "brn", "ghost_bn:16", "sync_bn", "l2", "rms", "frn", "evo_b0", '
        '"evo_s0:8", "split_bn:2", "none", "bn(momentum=0.01)", or a dict such as '
        '{"type": "batch", "momentum": 0.01}. edsr defaults to "none". At most 200 '
        "characters; arguments are bounded (normcore.norm_bounds: split_bn at most 16 splits, "
        "groups at most 8192, finite numbers; device and dtype are the service's). "
        "split_bn:K needs data.batch_size divisible by K, with more than one sample per split "
        "where a layer sees one value per channel (normcore.validate.check_norm_batch).",
    )
    conv: Literal["standard", "std"] = Field(
        default="standard",
        description='Convolutions: "standard" (nn.Conv2d) or "std", weight-standardized '
        'StdConv2d (the WS of GN + WS; pair it with a batch-independent norm such as "gn:8").',
    )
    num_classes: int = Field(default=10, ge=1, le=100_000, description="Output classes.")
    scale: int = Field(default=2, ge=1, le=8, description="Upscaling factor (edsr only).")
    in_channels: int | None = Field(
        default=None, ge=1, le=64, description="Input channels; default: taken from the data."
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout probability.")
    norm_position: Literal["before", "after"] = Field(
        default="before", description="Norm before (default) or after the activation."
    )
    width: int | None = Field(
        default=None, ge=1, le=1024, description="Base channel width; default: the arch's own."
    )
    depth: int | None = Field(
        default=None, ge=1, le=64, description="Blocks (convblock, edsr); default: the arch's own."
    )
    stem_padding: Literal["zeros", "none", "reflect", "replicate"] = Field(
        default="zeros",
        description="Padding of the first conv (lenet, resnet20 and resnet18 only; other archs "
        'refuse anything but "zeros"): "zeros" (same-size zero padding, as before), "none" (a '
        "valid conv: no padding, the maps shrink by kernel_size - 1 and the later layers adapt), "
        '"reflect" or "replicate" (nn.Conv2d padding_mode: the image\'s own border).',
    )

    @model_validator(mode="before")
    @classmethod
    def _edsr_norm_default(cls, data: Any) -> Any:
        # The seeds explain that BN destroys the contrast SR must keep, so edsr defaults to none.
        if isinstance(data, dict) and data.get("arch") == "edsr" and "norm" not in data:
            data = {**data, "norm": "none"}
        return data

    @model_validator(mode="after")
    def _stem_padding_arch(self) -> ModelSpec:
        if self.stem_padding != "zeros" and self.arch not in STEM_PADDING_ARCHS:
            raise ValueError(
                f"model.stem_padding {self.stem_padding!r} applies to "
                f"{', '.join(STEM_PADDING_ARCHS)} only; {self.arch} pads its first conv with "
                'zeros: remove model.stem_padding or set it to "zeros"'
            )
        return self

    @field_validator("norm")
    @classmethod
    def _check_norm(cls, value: NormChoice) -> NormChoice:
        from normcore.factory import validate_norm
        from normcore.norm_bounds import check_spec_norm

        check_spec_norm(value)  # length, shape and argument bounds before the full check
        validate_norm(value)
        return value


class DataSpec(_Strict):
    """Which data to train on, how it is split, batched and augmented."""

    dataset: Literal[
        "synthetic",
        "brightness",
        "digits",
        "sr-synthetic",
        "mnist",
        "cifar10",
        "imagefolder",
        "npz",
    ] = Field(description="Built-in set (no download) or a reader of files under the data root.")
    path: str | None = Field(
        default=None,
        max_length=1024,
        description="For mnist, cifar10, imagefolder and npz: a path relative to the data root.",
    )
    batch_size: int = Field(default=32, ge=1, le=4096, description="Training batch size.")
    eval_batch_size: int | None = Field(
        default=None, ge=1, le=8192, description="Validation batch size; default: batch_size."
    )
    val_fraction: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="Share of the data held out for validation (stratified by class). Not used "
        "when the files have their own test split (MNIST t10k-*, CIFAR test_batch, npz x_val): "
        "that split is the validation set.",
    )
    augment: bool = Field(
        default=False, description="Random crop with padding and horizontal flip on train batches."
    )
    normalize: bool = Field(
        default=True, description="Per-channel input normalization from the train split."
    )
    num_samples: int | None = Field(
        default=None,
        ge=2,
        le=1_000_000,
        description="Samples to generate (synthetic sets; default 1024). A generated set holds "
        "at most 2**28 values (num_samples x channels x image_size^2).",
    )
    image_size: int | None = Field(
        default=None,
        ge=4,
        le=512,
        description="Image side; images of another size are resized (bilinear, antialiased). "
        "Default: 16 for synthetic and brightness, 32 for sr-synthetic and imagefolder (image "
        "folders are resized to it, and the job's log says from what), the files' own size for "
        "digits, mnist, cifar10 and npz.",
    )
    channels: int | None = Field(
        default=None,
        ge=1,
        le=16,
        description="Image channels; grey is repeated, RGB becomes luma (BT.601). Default: 3 for "
        "synthetic, sr-synthetic and imagefolder (grey images are converted, and the log says "
        "so), 1 for brightness, the files' own for digits, mnist, cifar10 and npz.",
    )
    num_classes: int | None = Field(
        default=None,
        ge=2,
        le=1000,
        description="Classes of the synthetic set (2 to 10 shapes; default 4). Other sets have "
        "their own: digits, mnist and cifar10 10, brightness 4, imagefolder one per subfolder, "
        "npz the largest label + 1; model.num_classes must be at least that (422 at submit).",
    )

    @field_validator("path")
    @classmethod
    def _relative_path(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if "\x00" in value:
            raise ValueError("path must not contain NUL bytes")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            raise ValueError("path must not contain control characters (newlines, tabs, ...)")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("path must be valid Unicode (it holds a lone surrogate)") from None
        pure = PurePosixPath(value.replace("\\", "/"))
        if pure.is_absolute() or PureWindowsPath(value).drive or ".." in pure.parts:
            raise ValueError(
                f"path {value[:80]!r} must be relative to the data root and must not contain '..'"
            )
        for part in pure.parts:
            size = len(part.encode("utf-8"))
            if size > MAX_PATH_COMPONENT_BYTES:
                raise ValueError(
                    f"path component {part[:40]!r}... is {size} bytes long; the limit is "
                    f"{MAX_PATH_COMPONENT_BYTES} bytes per folder or file name"
                )
        return value

    @model_validator(mode="after")
    def _path_for_files(self) -> DataSpec:
        if self.dataset in FILE_DATASETS and not self.path:
            raise ValueError(
                f"dataset {self.dataset!r} reads files: give data.path relative to the data root"
            )
        if self.dataset not in FILE_DATASETS and self.path:
            raise ValueError(f"dataset {self.dataset!r} is built in and takes no data.path")
        if self.dataset in GENERATED_DEFAULTS:
            channels, side = GENERATED_DEFAULTS[self.dataset]
            samples = self.num_samples or GENERATED_DEFAULT_SAMPLES
            channels = self.channels or channels
            side = self.image_size or side
            values = samples * channels * side * side
            if values > MAX_GENERATED_VALUES:
                raise ValueError(
                    f"data set {self.dataset!r} of num_samples={samples} x channels={channels} "
                    f"x image_size={side}^2 holds {values:,} values; the limit is "
                    f"{MAX_GENERATED_VALUES:,} (1 GiB of float32): lower data.num_samples, "
                    "data.channels or data.image_size"
                )
        return self


class OptimSpec(_Strict):
    """Optimizer, learning-rate schedule and gradient clipping."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.1, gt=0.0, le=10.0, description="Peak learning rate.")
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    nesterov: bool = False
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas.")
    weight_decay: float = Field(default=5e-4, ge=0.0, le=1.0)
    decay_norm_and_bias: bool = Field(
        default=False, description="Apply weight decay to norm parameters and biases too."
    )
    schedule: Literal["constant", "step", "cosine"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0.0, le=1000.0, description="Linear warm-up.")
    step_epochs: int = Field(
        default=30, ge=1, le=10_000, description="Step schedule: epochs per decay."
    )
    step_gamma: float = Field(default=0.1, gt=0.0, le=1.0, description="Step schedule factor.")
    grad_clip: float | None = Field(
        default=None, gt=0.0, le=1e6, description="Clip the global gradient norm to this value."
    )

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("betas must each lie in [0, 1)")
        return value

    @model_validator(mode="after")
    def _nesterov(self) -> OptimSpec:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0.0):
            raise ValueError("nesterov needs optim.name 'sgd' with momentum > 0")
        return self


class ResourcesSpec(_Strict):
    """Where the job runs: device, number of GPUs (or CPU processes), mixed precision."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="auto: CUDA when the worker has resources.gpus CUDA devices, else CPU.",
    )
    gpus: int = Field(
        default=1, ge=1, le=16, description="Data-parallel processes (GPUs; gloo on CPU)."
    )
    amp: Literal["none", "bf16", "fp16"] = Field(
        default="none", description="Mixed precision on CUDA (ignored on CPU)."
    )
    channels_last: bool = Field(default=True, description="channels_last memory format on CUDA.")
    sync_bn: bool = Field(
        default=False, description="With gpus > 1: convert BatchNorm to SyncBatchNorm."
    )


class CheckpointSpec(_Strict):
    """When checkpoints are written and how many are kept."""

    every_epochs: int = Field(default=1, ge=1, le=10_000)
    keep_last: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Newest checkpoints kept; a server may set a lower maximum.",
    )
    precise_bn_batches: int = Field(
        default=0, ge=0, le=10_000, description="Recalibrate BN over this many batches first."
    )


class TelemetrySpec(_Strict):
    """Norm telemetry (``normcore.telemetry``): recorded at the start and at every evaluation;
    ``every_steps`` adds a record every that many steps (0: off)."""

    every_steps: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Also record the norm layers every this many steps (0: only at evaluations).",
    )


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._:+-]*$"
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$"


class JobSpec(_Strict):
    """A whole training job: model, data, optimizer, epochs, seed, resources and checkpoints."""

    name: str = Field(
        default="job",
        min_length=1,
        max_length=200,
        pattern=NAME_PATTERN,
        description="A label for people; need not be unique.",
    )
    tags: list[Annotated[str, Field(min_length=1, max_length=64, pattern=TAG_PATTERN)]] = Field(
        default_factory=list,
        max_length=16,
        description="Labels to find the job by (`GET /jobs?tag=`): at most 16, 1 to 64 "
        "characters each, letters, digits and `._:+-`.",
    )
    model: ModelSpec = Field(description="The network: see **model** below.")
    data: DataSpec = Field(description="The data: see **data** below.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="See **optim** below.")
    epochs: int = Field(default=10, ge=1, le=10_000, description="Passes over the train split.")
    max_runtime: float | None = Field(
        default=None,
        gt=0.0,
        le=MAX_RUNTIME_MINUTES,
        description="Minutes of training (all attempts together) after which the job writes a "
        "checkpoint and ends as timed_out; fractions allowed (0.5 = 30 s). Default: the "
        "server's cap (NORMCORE_MAX_RUNTIME_MINUTES), which also bounds it; no limit when "
        "training with normcore.train alone.",
    )
    seed: int = Field(
        default=0, ge=0, le=2**31 - 1, description="Seeds weights, data order and augmentation."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="See **resources** below."
    )
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, description="See **checkpoint** below."
    )
    telemetry: TelemetrySpec = Field(
        default_factory=TelemetrySpec, description="See **telemetry** below."
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        from normcore.factory import norm_uses_batch_stats

        if self.data.batch_size == 1 and norm_uses_batch_stats(self.model.norm):
            raise ValueError(
                f"batch_size 1 with norm {self.model.norm!r}: batch statistics of a single "
                "sample have no variance per channel, so BatchNorm cannot train. Use a batch "
                'size of at least 2, or a per-sample norm such as "gn:8", "ln" or "in".'
            )
        sr_model = self.model.arch in SR_ARCHS
        sr_data = self.data.dataset in SR_DATASETS
        if sr_model != sr_data:
            raise ValueError(
                f"arch {self.model.arch!r} and dataset {self.data.dataset!r} do not fit: "
                f"super-resolution archs {SR_ARCHS} need datasets {SR_DATASETS} and vice versa"
            )
        return self

    @property
    def task(self) -> Literal["classification", "super_resolution"]:
        """The kind of training the spec asks for."""
        return "super_resolution" if self.model.arch in SR_ARCHS else "classification"


def load_spec(source: str | Path | dict[str, Any] | JobSpec) -> JobSpec:
    """Read a JobSpec from a dict, a JSON/YAML file path, or return it unchanged.

    Raises ``normcore.specfile.SpecFileError`` (a ValueError, one-line reason) for a file that
    cannot be used, pydantic's ValidationError for a spec it holds that is not valid.
    """
    if isinstance(source, JobSpec):
        return source
    if isinstance(source, dict):
        return JobSpec.model_validate(source)
    return JobSpec.model_validate(read_spec(source))


def spec_json_schema() -> dict[str, Any]:
    """The JSON schema of JobSpec, for clients and the README's reference."""
    return JobSpec.model_json_schema()
