"""Where the ``normcore`` CLI's client commands find their server and token.

Precedence, for the URL and the token each: a command-line flag (``--url``, ``--token``), then
the environment (``NORMCORE_URL``, ``NORMCORE_TOKEN``), then the config file that
``normcore login`` writes, then the local default (the URL from ``NORMCORE_HOST``/``NORMCORE_PORT``,
127.0.0.1:8000 unless set, and, for a loopback URL, the admin token ``normcore serve`` wrote to
``<data_dir>/admin.token``).

The config file is ``$XDG_CONFIG_HOME/normcore/config.toml`` (``~/.config/normcore/config.toml``
when XDG_CONFIG_HOME is unset, empty or relative, as the XDG Base Directory specification says),
mode 0600 in a 0700 folder. Its token is only sent to the URL saved beside it: a ``--url`` or
``NORMCORE_URL`` naming another server does not receive it (a hand-written file with a token and
no url lends its token to whichever URL is in use).
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

ENV_URL = "NORMCORE_URL"
ENV_TOKEN = "NORMCORE_TOKEN"
CONFIG_NAME = "config.toml"


class ConfigError(ValueError):
    """Raised when the config file cannot be read or a value cannot be saved in it."""


@dataclass(frozen=True)
class Credentials:
    """The server URL and token a command uses, and where each came from (for messages).

    ``url_source`` and ``token_source`` are human-readable: "--url", "NORMCORE_URL",
    "<path of the config file>", "the local default", "<path of admin.token>"; ``token`` is None
    when no source had one (``token_source`` is then None too). ``local_token`` says, when
    there is no token, whether and where the local admin token file was looked for (for the
    401 message), e.g. "/srv/normcore-data/admin.token (no such file; ...)"; None when it was
    not looked for.
    """

    url: str
    token: str | None
    url_source: str
    token_source: str | None
    local_token: str | None = None


def config_dir(environ: dict[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/normcore``, or ``~/.config/normcore`` when that variable is unset,
    empty or not absolute (XDG Base Directory specification 0.8)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "normcore"


def config_path(environ: dict[str, str] | None = None) -> Path:
    """The config file ``normcore login`` writes: ``<config_dir>/config.toml``."""
    return config_dir(environ) / CONFIG_NAME


def read_config(path: Path) -> dict[str, str]:
    """The ``url`` and ``token`` saved in ``path`` (either may be missing); {} if there is no
    file. Raises ConfigError naming the file when it is not TOML or a value is not a string."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    out: dict[str, str] = {}
    for key in ("url", "token"):
        if key in data:
            if not isinstance(data[key], str) or not data[key].strip():
                raise ConfigError(f"{path}: {key} must be a non-empty string")
            out[key] = data[key].strip()
    return out


def _toml_string(value: str) -> str:
    """A TOML basic string for ``value``; ConfigError for control characters (never in a URL
    or a token). JSON's escapes for the rest (quote, backslash) are TOML's too."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ConfigError("control characters are not allowed in a URL or token")
    return json.dumps(value, ensure_ascii=False)


def write_config(path: Path, *, url: str, token: str) -> None:
    """Save ``url`` and ``token`` to ``path`` (mode 0600, its folder 0700), replacing the file
    atomically. Raises ConfigError for a value that cannot be saved, OSError for the disk."""
    text = (
        "# Written by `normcore login`; read by the normcore CLI. Keep it private (0600).\n"
        f"url = {_toml_string(url)}\n"
        f"token = {_toml_string(token)}\n"
    )
    if tomllib.loads(text) != {"url": url, "token": token}:  # a value our escaping got wrong
        raise ConfigError("the URL or token cannot be written to a TOML file as it is")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply to a file left by an earlier try
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _same_server(a: str, b: str) -> bool:
    return a.rstrip("/").lower() == b.rstrip("/").lower()


def resolve(
    *,
    url_flag: str | None,
    token_flag: str | None,
    default_url: str,
    environ: dict[str, str] | None = None,
) -> Credentials:
    """The URL and token for a command, by precedence flag > environment > config file > local
    default URL (see the module docstring); the token is None when none of the first three has
    one, and the caller may then try the local admin token file.

    Raises ConfigError when the config file is unreadable and a value is still missing.
    """
    env = os.environ if environ is None else environ
    path = config_path(env)
    config: dict[str, str] | None = None

    def from_config() -> dict[str, str]:
        nonlocal config
        if config is None:
            config = read_config(path)
        return config

    if url_flag:
        url, url_source = url_flag, "--url"
    elif env.get(ENV_URL):
        url, url_source = env[ENV_URL], ENV_URL
    elif "url" in from_config():
        url, url_source = from_config()["url"], str(path)
    else:
        url, url_source = default_url, "the local default"
    url = url.rstrip("/")

    if token_flag:
        return Credentials(url, token_flag, url_source, "--token")
    if env.get(ENV_TOKEN):
        return Credentials(url, env[ENV_TOKEN], url_source, ENV_TOKEN)
    saved = from_config()
    if "token" in saved and _same_server(saved.get("url", url), url):
        return Credentials(url, saved["token"], url_source, str(path))
    return Credentials(url, None, url_source, None)
