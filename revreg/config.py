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
    profiles = doc.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise InputError(f"{path}: [profiles] must be a table of profile tables")
    table = profiles.get(name) if name else doc.get("default")
    if table is None:
        if name:
            known = ", ".join(sorted(profiles)) or "none"
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


def _tokens(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    tokens = _load(path).get("tokens") or {}
    if not isinstance(tokens, dict) or not all(isinstance(v, str) for v in tokens.values()):
        raise InputError(f"{path}: [tokens] must map registry URLs to token strings (run `revreg login` again)")
    return tokens


def saved_token(url: str) -> str | None:
    """The token `revreg login` stored for a registry URL, if any."""
    return _tokens(credentials_path()).get(url.rstrip("/"))


def save_token(url: str, token: str) -> Path:
    """Store a token for `url`, creating the file with mode 0600 (and replacing it atomically)."""
    path = credentials_path()
    tokens = _tokens(path)
    tokens[url.rstrip("/")] = token
    return _write_tokens(path, tokens)


def _write_tokens(path: Path, tokens: dict[str, str]) -> Path:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    body = "# revreg API tokens, written by `revreg login`; keep this file private.\n[tokens]\n" + "".join(
        f"{_quote(k)} = {_quote(v)}\n" for k, v in sorted(tokens.items())
    )
    # A fresh private file beside the target (mkstemp: O_EXCL, mode 0600), then an atomic rename.
    fd, tmp = tempfile.mkstemp(prefix=".credentials.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def forget_token(url: str) -> bool:
    path = credentials_path()
    tokens = _tokens(path)
    if tokens.pop(url.rstrip("/"), None) is None:
        return False
    _write_tokens(path, tokens)
    return True


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
