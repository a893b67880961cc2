"""Reading a job or sweep spec file (JSON, or YAML with the safe loader) into a plain dict.

Shared by the HTTP client (``normcore.client``), ``normcore.spec.load_spec`` and the CLIs, so
every reader refuses a bad file with the same one-line reason. Depends on nothing of ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["SpecFileError", "read_spec"]


class SpecFileError(ValueError):
    """A spec file that cannot be used: missing, a folder, unreadable, not UTF-8, not valid
    JSON/YAML, a YAML tag or value JSON cannot carry, or not a mapping at the top. Its message is
    one line and does not name the file (the caller does)."""


def _yaml_message(exc: Exception) -> str:
    """One line for a PyYAML error: its problem and where (line/column, 1-based), without the
    multi-line source excerpt ``str(exc)`` carries."""
    problem = getattr(exc, "problem", None)
    if not problem:
        return " ".join(str(exc).split())
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    context = getattr(exc, "context", None)
    text = f"{context}: {problem}" if context else str(problem)
    if mark is not None:
        text += f" (line {mark.line + 1} column {mark.column + 1})"
    return "invalid YAML: " + " ".join(text.split())


def read_spec(path: str | Path) -> dict[str, Any]:
    """A job or sweep spec from a JSON file, or a YAML file (``.yaml``/``.yml``, safe loader:
    no tags that build Python objects). Raises SpecFileError, with a one-line reason, for any
    file that cannot be used (see SpecFileError)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecFileError("no such file") from None
    except IsADirectoryError:
        raise SpecFileError("is a directory, not a spec file") from None
    except OSError as exc:
        raise SpecFileError(f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecFileError(f"not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # only for YAML specs

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise SpecFileError(_yaml_message(exc)) from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                # "Expecting value: line 2 column 1 (char 5)" without the char offset
                raise SpecFileError(str(exc).split(" (char ")[0]) from None
    except RecursionError:
        raise SpecFileError("nested too deeply") from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise SpecFileError(f"a job spec must be a JSON/YAML object (a mapping), not {kind}")
    try:  # what YAML can hold and a JSON body cannot: dates, sets, bytes, NaN, ...
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise SpecFileError(f"a value cannot be sent as JSON: {exc}") from None
    return data
