"""A spec file the CLI cannot use (bad YAML, a YAML tag, missing, a folder, not UTF-8, not a
mapping) is one line on stderr and a non-zero exit from validate, submit and sweep, before any
server is asked; and normcore.client.read_spec raises SpecFileError for each."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from normcore.client import SpecFileError, read_spec
from service.cli import app as cli_app

# Nothing listens on port 9 (discard): a command that got as far as the server would say
# "cannot reach the server" instead of the spec's error.
ENV = {"NORMCORE_URL": "http://127.0.0.1:9", "NORMCORE_TOKEN": "unused"}

BAD_FILES: dict[str, tuple[bytes, str]] = {
    "syntax.yaml": (b"model:\n  arch: lenet\n  norm: [1,2\n", "invalid YAML: while parsing"),
    "tag.yaml": (
        b"seed: !!python/object/apply:os.system ['echo pwned']\n",
        "could not determine a constructor for the tag",
    ),
    "malformed.json": (b'{"model":\n', "Expecting value: line 2 column 1"),
    "latin1.yaml": (b"name: caf\xe9\n", "not UTF-8 text"),
    "list.yaml": (b"- 1\n- 2\n", "must be a JSON/YAML object (a mapping), not a list"),
    "empty.yml": (b"", "not empty"),
    "date.yaml": (b"seed: 2020-01-01\n", "cannot be sent as JSON"),
}


@pytest.fixture
def bad_file(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    """One of BAD_FILES written to tmp_path, with the text its error must hold."""
    name = request.param
    content, expected = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    return path, expected


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, list(args), env=ENV)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


@pytest.mark.parametrize("bad_file", sorted(BAD_FILES), indirect=True)
@pytest.mark.parametrize("command", ["validate", "submit", "sweep"])
def test_bad_spec_file_is_one_line_error(command: str, bad_file: tuple[Path, str]) -> None:
    path, expected = bad_file
    code, output = _run(command, str(path))
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith(f"error: {path}: "), output
    assert expected in lines[0], output
    assert "Traceback" not in output and "cannot reach the server" not in output


@pytest.mark.parametrize("command", ["validate", "submit", "sweep"])
def test_missing_file_and_directory_are_one_line_errors(command: str, tmp_path: Path) -> None:
    code, output = _run(command, str(tmp_path / "nope.yaml"))
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert "no such" in output
    code, output = _run(command, str(tmp_path))
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert "is a directory" in output


def test_read_spec_raises_spec_file_error_and_reads_good_files(tmp_path: Path) -> None:
    for name, (content, expected) in BAD_FILES.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(SpecFileError) as info:
            read_spec(path)
        assert expected in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SpecFileError, match="no such file"):
        read_spec(tmp_path / "missing.json")
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  arch: lenet\n  norm: bn\nepochs: 2\n", encoding="utf-8")
    assert read_spec(good) == {"model": {"arch": "lenet", "norm": "bn"}, "epochs": 2}
    assert issubclass(SpecFileError, ValueError)  # callers catching ValueError still do
