"""Ed25519 signing keys in a keyring directory: NAME.key (PKCS#8 PEM, optionally encrypted)
and NAME.pub (SubjectPublicKeyInfo PEM). A key id is the sha256 of the public key's DER."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from revreg.artifacts.safetensors_io import atomic_output
from revreg.errors import KeyringError

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PASSPHRASE_ENV = "REVREG_KEY_PASSPHRASE"


def default_keys_dir() -> Path:
    if os.environ.get("REVREG_KEYS"):
        return Path(os.environ["REVREG_KEYS"])
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "revreg" / "keys"


def keyid_of(key: PublicKey) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class TrustedKey:
    name: str
    keyid: str
    public_key: PublicKey


@dataclass(frozen=True)
class Signer:
    name: str
    keyid: str
    private_key: ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class KeyInfo:
    name: str
    keyid: str
    has_private: bool
    encrypted: bool


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise KeyringError(f"invalid key name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    return name


def passphrase_from_env(var: str | None) -> bytes | None:
    """The passphrase in environment variable `var`; None when `var` is None."""
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise KeyringError(f"environment variable {var} is not set: it must hold the key passphrase")
    return value.encode("utf-8")


def load_public_pem(pem: bytes, what: str) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise KeyringError(f"{what} is not a PEM public key") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise KeyringError(f"{what}: only Ed25519 and ECDSA public keys are supported")
    return key


def _load_public(path: Path) -> PublicKey:
    try:
        return load_public_pem(path.read_bytes(), str(path))
    except OSError as exc:
        raise KeyringError(f"cannot read {path}: {exc.strerror}") from exc


class Keyring:
    def __init__(self, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory else default_keys_dir()

    def _paths(self, name: str) -> tuple[Path, Path]:
        check_name(name)
        return self.directory / f"{name}.key", self.directory / f"{name}.pub"

    def generate(self, name: str, passphrase: bytes | None = None) -> KeyInfo:
        private_path, public_path = self._paths(name)
        if private_path.exists() or public_path.exists():
            raise KeyringError(f"key {name!r} already exists in {self.directory}")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ed25519.Ed25519PrivateKey.generate()
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        )
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        with atomic_output(private_path, mode=0o600) as fh:
            fh.write(pem)
        self._write_public(public_path, key.public_key())
        return KeyInfo(name, keyid_of(key.public_key()), True, bool(passphrase))

    def _write_public(self, path: Path, key: PublicKey) -> None:
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        with atomic_output(path) as fh:
            fh.write(pem)

    def import_public(self, name: str, pem_path: Path) -> KeyInfo:
        _, public_path = self._paths(name)
        key = _load_public(Path(pem_path))
        keyid = keyid_of(key)
        for existing in self.list():
            if existing.name == name or existing.keyid == keyid:
                raise KeyringError(f"key {existing.name!r} ({existing.keyid}) is already in the keyring")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._write_public(public_path, key)
        return KeyInfo(name, keyid, False, False)

    def public_pem(self, name: str) -> bytes:
        _, public_path = self._paths(name)
        if not public_path.is_file():
            raise KeyringError(f"no key named {name!r} in {self.directory}")
        return public_path.read_bytes()

    def list(self) -> list[KeyInfo]:
        if not self.directory.is_dir():
            return []
        out = []
        for public_path in sorted(self.directory.glob("*.pub")):
            name = public_path.stem
            private_path = self.directory / f"{name}.key"
            encrypted = private_path.is_file() and b"ENCRYPTED" in private_path.read_bytes()[:64]
            out.append(KeyInfo(name, keyid_of(_load_public(public_path)), private_path.is_file(), encrypted))
        return out

    def trusted(self) -> dict[str, TrustedKey]:
        """Every public key in the keyring, by key id: the trust anchors for verification."""
        out = {}
        for info in self.list():
            key = _load_public(self.directory / f"{info.name}.pub")
            out[info.keyid] = TrustedKey(info.name, info.keyid, key)
        return out

    def signer(self, name: str, passphrase: bytes | None = None) -> Signer:
        private_path, _ = self._paths(name)
        if not private_path.is_file():
            raise KeyringError(
                f"no private key named {name!r} in {self.directory}: create one with `revreg keys generate {name}`"
            )
        pem = private_path.read_bytes()
        if b"ENCRYPTED" in pem[:64] and passphrase is None:
            raise KeyringError(
                f"key {name!r} is encrypted: put its passphrase in ${PASSPHRASE_ENV} "
                "or name a variable with --passphrase-env"
            )
        try:
            key = serialization.load_pem_private_key(pem, password=passphrase if b"ENCRYPTED" in pem[:64] else None)
        except (ValueError, TypeError) as exc:
            raise KeyringError(f"cannot decrypt key {name!r}: wrong passphrase") from exc
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise KeyringError(f"key {name!r} is not an Ed25519 key")
        return Signer(name, keyid_of(key.public_key()), key)
