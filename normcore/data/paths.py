"""Paths under the data root: a user's relative path can never reach a file outside it."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath


class DataPathError(ValueError):
    """A data path escapes the data root, or names nothing; messages show the relative path."""


class DataNotFoundError(DataPathError, FileNotFoundError):
    """A data file or folder does not exist (a ValueError and a FileNotFoundError)."""


def _root(root: str | Path | None) -> Path:
    if root is None:
        raise DataNotFoundError("no data root is configured; file datasets read from under it")
    path = Path(root)
    if not path.is_dir():
        raise DataNotFoundError("the data root does not exist or is not a folder")
    return path.resolve(strict=True)


def resolve_under(root: str | Path | None, relative: str | Path) -> Path:
    """``root/relative`` with symlinks and ``..`` resolved; ValueError if it leaves ``root``.

    Absolute paths, ``..`` escapes and symlinks that point outside the root are refused. The
    result need not exist (see ``existing_under``).
    """
    text = str(relative)
    if "\x00" in text:
        raise DataPathError(f"data path {text!r} contains a NUL byte")
    if (
        PurePosixPath(text).is_absolute()
        or PureWindowsPath(text).is_absolute()
        or PureWindowsPath(text).drive
    ):
        raise DataPathError(
            f"data path '{text}' escapes the data root: it must be relative to the data root"
        )
    base = _root(root)
    # resolve() follows every symlink along the way, so a link inside the root that points out
    # is caught here just like a literal '..'
    target = (base / text).resolve()
    if not target.is_relative_to(base):
        raise DataPathError(
            f"data path '{text}' escapes the data root (through '..' or a symlink); "
            "give a path inside the data root"
        )
    return target


def existing_under(root: str | Path | None, relative: str | Path, *, kind: str = "file") -> Path:
    """``resolve_under`` that also requires a ``kind`` ("file" or "folder") to be there."""
    path = resolve_under(root, relative)
    if kind == "file" and path.exists() and not path.is_file() and not path.is_dir():
        # a FIFO or device: say what it is (opening a FIFO to find out would block)
        raise DataPathError(
            f"data file '{relative}' is not a regular file: only regular files are read"
        )
    ok = path.is_file() if kind == "file" else path.is_dir()
    if not ok:
        raise DataNotFoundError(f"data {kind} '{relative}' not found under the data root")
    return path
