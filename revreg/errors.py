"""The exceptions revreg raises: one base class, a few precise kinds, each with its exit code.

The CLI catches `RevregError` once and prints its message as one line.
"""

from __future__ import annotations

from collections.abc import Sequence


class RevregError(Exception):
    """Base class. Exit codes: 1 a check ran and failed (signature, digest, tamper, revoked,
    gate, fsck, audit); 2 bad input or usage; 3 the registry or server could not be reached."""

    exit_code = 2


class InputError(RevregError):
    """An input could not be parsed or is not what the command needs."""


class BaseMismatch(InputError):
    """A model, or a base's files, are not the base a behavior is bound to."""


class StackError(InputError):
    """An attach or a verified unload that the current stack of behaviors does not allow."""


class FormatError(InputError):
    """A file is not a well-formed safetensors file or revreg artifact."""


class IntegrityError(RevregError):
    """Bytes do not match the digest that was recorded for them."""

    exit_code = 1


class RollbackError(IntegrityError):
    """After unload the model is not what it was when the behavior was attached."""

    def __init__(self, message: str, changes: Sequence[object] = ()) -> None:
        super().__init__(message)
        self.changes = list(changes)  # the fingerprint's Change entries, one per difference


class SignatureError(RevregError):
    """A signature is missing, malformed, by an unknown key, or does not verify."""

    exit_code = 1


class UnknownKeyError(SignatureError):
    """No signature is by a key the verifier trusts; callers add how to trust one."""


class KeyringError(RevregError):
    """A key cannot be found, created, or decrypted."""


class Unreachable(RevregError):
    """The registry (its database, or its server) did not answer: not the input's fault."""

    exit_code = 3


class OutputError(RevregError):
    """Standard output could not be written (a full disk behind it, a reader that went away).
    The command ran to its end: nothing it did is undone because its report was lost."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(
            f"cannot write to standard output: {cause.strerror or cause}; the command ran to its end, "
            "its output is lost"
        )
        self.errno = cause.errno


class CheckFailed(RevregError):
    """A comparison or verification ran to the end and found a difference."""

    exit_code = 1
