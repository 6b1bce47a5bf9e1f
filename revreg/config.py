"""The user's configuration: profiles in ~/.config/revreg/config.toml (or $REVREG_CONFIG) and API
tokens stored by `revreg login` in credentials.toml beside it, readable by the owner only.

A profile fills in what the environment does not say: a flag beats an environment variable,
which beats the profile. Profile keys map one to one to environment variables.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from revreg.errors import InputError

CONFIG_ENV = "REVREG_CONFIG"
PROFILE_ENV = "REVREG_PROFILE"
# profile key -> the environment variable it stands for
SETTINGS = {
    "registry": "REVREG_REGISTRY",
    "keys": "REVREG_KEYS",
    "actor": "REVREG_ACTOR",
    "pin_publishers": "REVREG_PIN_PUBLISHERS",
    "pin_verifiers": "REVREG_PIN_VERIFIERS",
}


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "revreg"


def config_path() -> Path:
    return Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else config_dir() / "config.toml"


def credentials_path() -> Path:
    return config_path().parent / "credentials.toml"


def _load(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path} is not valid UTF-8 TOML: {exc}") from exc


def profile_settings(name: str | None) -> dict[str, str]:
    """The environment a profile stands for: [profiles.NAME] when named (an error if missing),
    else [default] if the file has one. No file, no profile: nothing."""
    path = config_path()
    if not path.is_file():
        if name:
            raise InputError(f"profile {name!r} requested but there is no config file at {path}")
        return {}
    doc = _load(path)
    table = (doc.get("profiles") or {}).get(name) if name else doc.get("default")
    if table is None:
        if name:
            known = ", ".join(sorted(doc.get("profiles") or {})) or "none"
            raise InputError(f"no profile {name!r} in {path} (profiles: {known})")
        return {}
    if not isinstance(table, dict):
        raise InputError(f"{path}: a profile is a table of settings")
    out = {}
    for key, value in table.items():
        if key not in SETTINGS:
            raise InputError(f"{path}: unknown setting {key!r} (known: {', '.join(SETTINGS)})")
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        if not isinstance(value, str):
            raise InputError(f"{path}: setting {key} must be a string (or a list of strings for pins)")
        out[SETTINGS[key]] = os.path.expanduser(value) if key == "keys" else value
    return out


def saved_token(url: str) -> str | None:
    """The token `revreg login` stored for a registry URL, if any."""
    path = credentials_path()
    if not path.is_file():
        return None
    token = (_load(path).get("tokens") or {}).get(url.rstrip("/"))
    return token if isinstance(token, str) else None


def save_token(url: str, token: str) -> Path:
    """Store a token for `url`, creating the file with mode 0600 (and replacing it atomically)."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tokens = dict((_load(path).get("tokens") or {}) if path.is_file() else {})
    tokens[url.rstrip("/")] = token
    body = "# revreg API tokens, written by `revreg login`; keep this file private.\n[tokens]\n" + "".join(
        f"{_quote(k)} = {_quote(v)}\n" for k, v in sorted(tokens.items())
    )
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def forget_token(url: str) -> bool:
    path = credentials_path()
    if saved_token(url) is None:
        return False
    tokens = {k: v for k, v in (_load(path).get("tokens") or {}).items() if k != url.rstrip("/")}
    path.unlink()
    for k, v in tokens.items():
        save_token(k, v)
    return True


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
