"""JobSpec validation messages, file loading, and the exported JSON schema."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from normcore.spec import EXAMPLE_SPEC, JobSpec, load_spec, spec_json_schema

REPO = Path(__file__).resolve().parents[2]

DESIGN_EXAMPLE: dict[str, Any] = EXAMPLE_SPEC


def _errors(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(dotted field path, message) of every validation error for ``data``."""
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(data)
    return [(".".join(map(str, e["loc"])), e["msg"]) for e in info.value.errors()]


def _with(**changes: Any) -> dict[str, Any]:
    """DESIGN_EXAMPLE with ``section={...}`` merged in (or a top-level value replaced)."""
    data = copy.deepcopy(DESIGN_EXAMPLE)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return data


def test_design_example_is_valid() -> None:
    spec = JobSpec.model_validate(DESIGN_EXAMPLE)
    assert spec.model.norm == "gn:8"
    assert spec.task == "classification"


def test_unknown_arch_lists_the_valid_ones() -> None:
    [(where, message)] = _errors(_with(model={"arch": "resnet21"}))
    assert where == "model.arch"
    for arch in ("convblock", "lenet", "vgg11", "resnet20", "resnet18", "edsr"):
        assert arch in message


def test_unknown_norm_lists_the_valid_ones() -> None:
    [(where, message)] = _errors(_with(model={"norm": "batchnorm_typo"}))
    assert where == "model.norm"
    assert "unknown norm" in message
    for name in ("bn", "gn", "ln", "in", "frozen_bn", "brn", "ghost_bn", "none"):
        assert name in message


def test_bad_norm_argument_is_refused() -> None:
    [(where, _message)] = _errors(_with(model={"norm": "gn:0"}))
    assert where == "model.norm"


@pytest.mark.parametrize("lr", [-0.1, 0.0, 11.0])
def test_learning_rate_out_of_range(lr: float) -> None:
    [(where, _message)] = _errors(_with(optim={"lr": lr}))
    assert where == "optim.lr"


def test_batch_size_one_with_batch_norm_is_refused_with_the_reason() -> None:
    [(_where, message)] = _errors(_with(model={"norm": "bn"}, data={"batch_size": 1}))
    assert "batch_size 1" in message
    assert "variance" in message
    assert "gn:8" in message  # says what to use instead


def test_batch_size_one_with_a_per_sample_norm_is_fine() -> None:
    spec = JobSpec.model_validate(_with(model={"norm": "gn:8"}, data={"batch_size": 1}))
    assert spec.data.batch_size == 1


@pytest.mark.parametrize("path", ["../secret", "a/../../b", "/etc/passwd", "..\\x"])
def test_data_path_escaping_the_data_root_is_refused(path: str) -> None:
    [(where, message)] = _errors(_with(data={"dataset": "npz", "path": path}))
    assert where == "data.path"
    assert "relative" in message


def test_relative_data_path_is_accepted() -> None:
    spec = JobSpec.model_validate(_with(data={"dataset": "npz", "path": "sets/train.npz"}))
    assert spec.data.path == "sets/train.npz"


def test_file_dataset_needs_a_path_and_built_in_refuses_one() -> None:
    [(_w, message)] = _errors(_with(data={"dataset": "mnist"}))
    assert "data.path" in message
    [(_w, message)] = _errors(_with(data={"dataset": "digits", "path": "x"}))
    assert "takes no data.path" in message


@pytest.mark.parametrize(
    ("section", "key"),
    [(None, "learning_rate"), ("model", "normalization"), ("optim", "lr_schedule")],
)
def test_extra_keys_are_refused(section: str | None, key: str) -> None:
    data = copy.deepcopy(DESIGN_EXAMPLE)
    (data[section] if section else data)[key] = 1
    [(where, message)] = _errors(data)
    assert where.endswith(key)
    assert "Extra inputs are not permitted" in message


def test_sr_arch_and_dataset_must_match() -> None:
    [(_w, message)] = _errors(_with(model={"arch": "edsr"}))
    assert "do not fit" in message


def test_edsr_defaults_to_no_norm() -> None:
    spec = JobSpec.model_validate({"model": {"arch": "edsr"}, "data": {"dataset": "sr-synthetic"}})
    assert spec.model.norm == "none"
    assert spec.task == "super_resolution"


def test_nesterov_needs_sgd_with_momentum() -> None:
    [(_w, message)] = _errors(_with(optim={"name": "adamw", "nesterov": True}))
    assert "nesterov" in message


def test_load_spec_from_json_yaml_and_dict(tmp_path: Path) -> None:
    json_path = tmp_path / "spec.json"
    json_path.write_text(json.dumps(DESIGN_EXAMPLE))
    yaml_path = tmp_path / "spec.yaml"
    yaml_path.write_text(
        "model: {arch: lenet, norm: bn}\ndata: {dataset: digits, batch_size: 16}\nepochs: 2\n"
    )
    assert load_spec(json_path) == JobSpec.model_validate(DESIGN_EXAMPLE)
    assert load_spec(DESIGN_EXAMPLE) == load_spec(json_path)
    assert load_spec(yaml_path).data.batch_size == 16
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON/YAML object"):
        load_spec(bad)


def test_example_specs_in_the_repo_are_valid() -> None:
    examples = sorted((REPO / "examples").glob("*.json")) + sorted(
        (REPO / "examples").glob("*.yaml")
    )
    assert examples, "examples/ holds no spec"
    for path in examples:
        load_spec(path)


def test_json_schema_validates_the_design_example() -> None:
    schema = spec_json_schema()
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)
    assert not list(validator.iter_errors(DESIGN_EXAMPLE))


def test_json_schema_rejects_what_the_model_rejects() -> None:
    validator = jsonschema.Draft202012Validator(spec_json_schema())
    assert list(validator.iter_errors(_with(model={"arch": "resnet21"})))
    assert list(validator.iter_errors(_with(optim={"lr": -1})))
    assert list(validator.iter_errors(_with(extra_key=1)))
    missing_model = copy.deepcopy(DESIGN_EXAMPLE)
    del missing_model["model"]
    assert list(validator.iter_errors(missing_model))


def test_example_spec_is_design_md_verbatim() -> None:
    """EXAMPLE_SPEC is the JSON block of DESIGN.md ("A job spec, as a user writes it")."""
    design = REPO.parent / "shared" / "DESIGN.md"
    assert design.is_file(), f"{design} is missing: shared/ belongs beside the repository"
    text = design.read_text(encoding="utf-8").split("A job spec, as a user writes it", 1)[1]
    block = text.split("```json", 1)[1].split("```", 1)[0]
    assert json.loads(block) == EXAMPLE_SPEC


# --------------------------------------------------------------------------- bounds (issue 17)


def _msg(data: dict[str, Any]) -> str:
    return " | ".join(f"{loc}: {msg}" for loc, msg in _errors(data))


@pytest.mark.parametrize(
    ("norm", "expected"),
    [
        ("split_bn:100000", "num_splits must be an integer in [2, 16], got 100000"),
        ("split_bn(num_splits=17)", "num_splits must be an integer in [2, 16]"),
        ({"type": "split_bn", "num_splits": 10**400}, "got a huge integer"),
        ("ghost_bn:5000", "virtual_batch_size must be an integer in [2, 4096]"),
        ("gn:9000", "num_groups must be an integer in [1, 8192]"),
        ("evo_s0:9000", "num_groups must be an integer in [1, 8192]"),
        ("lrn:2000", "size must be an integer in [1, 1024]"),
        ("brn(warmup_steps=10000000000)", "warmup_steps must be an integer in [0, 1e+09]"),
        ("gn:8.5", "num_groups must be an integer"),
        ("bn(eps=1e999)", "eps must be a finite number, got inf"),
        ("bn(eps=2.0)", "eps must lie in [0, 1]"),
        ({"type": "l2", "scale": float("nan")}, "scale must be a finite number"),
        ("bn(device='cuda')", "'device' is set by the service"),
        ({"type": "bn", "dtype": "float64"}, "'dtype' is set by the service"),
        ({"type": "bn", "eps": [[[1e-3]]]}, "model.norm.eps must be a number"),
        ({"type": "bn", "x y": 1}, "must be an identifier"),
        ({"type": "bn", **{f"k{i}": 1 for i in range(20)}}, "the limit is 16"),
        (
            "bn(momentum=" + "-" * 5000 + "1)",
            "model.norm is 5014 characters long; the limit is 200",
        ),
        ("1+" * 100000, "model.norm is 200000 characters long; the limit is 200"),
        ("gn:8\u00e9", "printable ASCII"),
        ("bn(small_batch='" + "x" * 100 + "')", "at most 64 characters"),
    ],
)
def test_norm_arguments_are_bounded(norm: Any, expected: str) -> None:
    """Each count a norm takes has a limit, refused by name at validation (the issue's
    split_bn:100000 and the parser-breaking strings among them)."""
    message = _msg(_with(model={"norm": norm}))
    assert "model.norm" in message and expected in message, message


@pytest.mark.parametrize(
    "norm", ["split_bn:16", "ghost_bn:4096", "gn:8", "lrn:5", "bn(momentum=0.01, eps=1e-3)"]
)
def test_norm_arguments_at_the_limit_pass(norm: str) -> None:
    JobSpec.model_validate(_with(model={"norm": norm}, data={"batch_size": 64}))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a" * 256, "is 256 bytes long; the limit is 255 bytes"),
        ("ok/" + "\u00e9" * 128 + "/x", "is 256 bytes long"),
        ("a/" * 600, "at most 1024 characters"),
        ("a\nb", "control characters"),
        ("a\x00b", "NUL"),
        ("C:/data", "must be relative"),
        ("/etc/passwd", "must be relative"),
        ("x/../../etc", "must not contain '..'"),
    ],
)
def test_data_path_is_bounded(path: str, expected: str) -> None:
    """The issue's 256-character component and the rest: refused with a message, not an
    OSError from the file system later."""
    data = _with(data={"dataset": "mnist", "path": path})
    message = _msg(data)
    assert "data.path" in message and expected in message, message


def test_data_path_at_the_component_limit_passes() -> None:
    JobSpec.model_validate(_with(data={"dataset": "mnist", "path": "d/" + "a" * 255}))


def test_generated_data_set_size_is_bounded() -> None:
    """The issue's 100k x 4 x 32x32 synthetic set (5.2 GB in training) is over 2**28 values."""
    data = _with(
        data={"dataset": "synthetic", "num_samples": 100_000, "channels": 4, "image_size": 32}
    )
    message = _msg(data)
    assert "409,600,000 values; the limit is 268,435,456" in message, message
    ok = _with(
        data={"dataset": "synthetic", "num_samples": 65_536, "channels": 4, "image_size": 32}
    )
    JobSpec.model_validate(ok)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"optim": {"lr": float("nan")}}, "optim.lr"),
        ({"optim": {"grad_clip": float("inf")}}, "optim.grad_clip"),
        ({"optim": {"betas": [0.9, float("nan")]}}, "optim.betas"),
        ({"model": {"dropout": float("nan")}}, "model.dropout"),
        ({"optim": {"step_epochs": 10**6}}, "optim.step_epochs"),
        ({"checkpoint": {"keep_last": 101}}, "checkpoint.keep_last"),
        ({"epochs": 10**30}, "epochs"),
        ({"seed": -1}, "seed"),
    ],
)
def test_numbers_are_finite_and_bounded(changes: dict[str, Any], field: str) -> None:
    """NaN/Infinity (accepted by Python's JSON parser) and out-of-range ints name their field."""
    fields = [loc for loc, _ in _errors(_with(**changes))]
    assert any(loc.startswith(field) for loc in fields), fields


def test_every_int_field_has_an_upper_bound() -> None:
    """No integer in the schema is unbounded: each count a spec takes has a maximum."""
    schema = spec_json_schema()
    unbounded = []
    for name, section in schema["$defs"].items():
        for field, prop in section.get("properties", {}).items():
            options = prop.get("anyOf", [prop])
            for option in options:
                if option.get("type") == "integer" and "maximum" not in option:
                    unbounded.append(f"{name}.{field}")
    for field, prop in schema["properties"].items():
        if prop.get("type") == "integer" and "maximum" not in prop:
            unbounded.append(field)
    assert not unbounded, unbounded


_NORM_PIECES = st.sampled_from(
    ["bn", "gn", "split_bn", "ghost_bn", "lrn", "l2", "brn", "evo_s0", "none", ":", "(", ")",
     "=", ",", " ", "momentum", "eps", "num_groups", "num_splits", "size", "device", "dtype",
     "1", "0", "-", "+", "1e999", "100000", "9" * 30, "[", "]", "{", "}", "'x'", "None", "True",
     "lambda", "__import__", "\u00b2", "\x00", "\\", '"']
)  # fmt: skip
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**80), 2**80),
    st.floats(),
    st.text(max_size=80),
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    norm=st.one_of(
        st.lists(_NORM_PIECES, max_size=16).map("".join),
        st.text(max_size=300),
        st.tuples(_NORM_PIECES, st.integers(1, 3000)).map(lambda t: t[0] * t[1]),
        st.dictionaries(
            st.one_of(st.sampled_from(["type", "name", "eps", "num_splits", "device"]), st.text()),
            st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3), st.just([[[[[1]]]]])),
            max_size=5,
        ),
    )
)
def test_any_norm_is_accepted_or_refused_with_a_message(norm: Any) -> None:
    """Whatever model.norm holds, validation ends in a ValidationError (a 422), never another
    exception (RecursionError, MemoryError, OverflowError, TypeError: a 500 in the API)."""
    try:
        spec = JobSpec.model_validate(_with(model={"norm": norm}, data={"batch_size": 64}))
    except ValidationError:
        return
    json.dumps(spec.model_dump(mode="json"), allow_nan=False)  # storable and renderable


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    path=st.lists(
        st.one_of(
            st.sampled_from(["..", ".", "", "/", "\\", "~", "C:", "a" * 255, "a" * 256]),
            st.text(max_size=30),
            st.integers(1, 300).map(lambda n: "\u00e9" * n),
        ),
        max_size=8,
    ).map("/".join)
)
def test_any_data_path_is_accepted_or_refused_with_a_message(path: str) -> None:
    """An accepted data.path is relative, without '..', NUL or control characters, and every
    component fits in a file name (255 bytes): the file system never raises on it."""
    try:
        spec = JobSpec.model_validate(_with(data={"dataset": "mnist", "path": path}))
    except ValidationError:
        return
    accepted = spec.data.path or ""
    parts = accepted.replace("\\", "/").split("/")
    assert ".." not in parts and not accepted.startswith(("/", "\\"))
    assert all(len(p.encode("utf-8")) <= 255 for p in parts)
    assert not any(ord(c) < 0x20 for c in accepted)
