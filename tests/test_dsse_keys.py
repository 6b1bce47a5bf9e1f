"""DSSE envelopes (the spec's published test vector) and Ed25519 keys in a keyring."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from revreg.artifacts.dsse import Envelope, pae, sign, verify, verify_signature
from revreg.artifacts.keys import Keyring, TrustedKey
from revreg.errors import FormatError, KeyringError, SignatureError

# From the DSSE protocol document (protocol.md, "Test Vectors").
SPEC_X = 46950820868899156662930047687818585632848591499744589407958293238635476079160
SPEC_Y = 5640078356564379163099075877009565129882514886557779369047442380624545832820
SPEC_ENVELOPE = (
    '{"payload": "aGVsbG8gd29ybGQ=", "payloadType": "http://example.com/HelloWorld", "signatures": '
    '[{"sig": "A3JqsQGtVsJ2O2xqrI5IcnXip5GToJ3F+FnZ+O88SjtR6rDAajabZKciJTfUiHqJPcIAriEGAHTVeCUjW2JIZA=="}]}'
)


def test_pae_matches_the_dsse_spec_vector():
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters():
    assert pae("t\u00e9", b"") == "DSSEv1 3 t\u00e9 0 ".encode()


def test_dsse_spec_vector_signature_verifies():
    envelope = Envelope.from_json(SPEC_ENVELOPE, canonical=False)
    key = ec.EllipticCurvePublicNumbers(SPEC_X, SPEC_Y, ec.SECP256R1()).public_key()
    assert envelope.payload == b"hello world"
    verify_signature(key, envelope.signatures[0].sig, pae(envelope.payload_type, envelope.payload))
    with pytest.raises(SignatureError):
        verify_signature(key, envelope.signatures[0].sig, pae(envelope.payload_type, b"hello world!"))


def test_url_safe_base64_is_read_from_foreign_envelopes_only():
    sig = base64.b64decode("A3JqsQGtVsJ2O2xqrI5IcnXip5GToJ3F+FnZ+O88SjtR6rDAajabZKciJTfUiHqJPcIAriEGAHTVeCUjW2JIZA==")
    url_safe = SPEC_ENVELOPE.replace(base64.b64encode(sig).decode(), base64.urlsafe_b64encode(sig).decode())
    assert Envelope.from_json(url_safe, canonical=False).signatures[0].sig == sig
    with pytest.raises(FormatError):
        Envelope.from_json(url_safe)


def test_sign_and_verify_round_trip_and_tamper(tmp_path: Path):
    ring = Keyring(tmp_path)
    ring.generate("alice")
    signer = ring.signer("alice")
    envelope = sign(b'{"a":1}', "application/x-test", signer)
    parsed = Envelope.from_json(envelope.to_json())
    verified = verify(parsed, "application/x-test", ring.trusted())
    assert verified.payload == b'{"a":1}' and verified.key.name == "alice"
    tampered = Envelope(b'{"a":2}', parsed.payload_type, parsed.signatures)
    with pytest.raises(SignatureError, match="does not verify"):
        verify(tampered, "application/x-test", ring.trusted())
    with pytest.raises(SignatureError, match="payloadType"):
        verify(parsed, "application/x-other", ring.trusted())


def test_unknown_key_is_named(tmp_path: Path):
    ring = Keyring(tmp_path / "a")
    ring.generate("alice")
    envelope = sign(b"x", "t", ring.signer("alice"))
    with pytest.raises(SignatureError, match="unknown key sha256:"):
        verify(envelope, "t", {})


def test_malformed_envelopes_are_format_errors():
    for text in [
        "[]",
        "{}",
        '{"payload": "!!", "payloadType": "t", "signatures": [{"sig": ""}]}',
        '{"payload": "", "payloadType": "t", "signatures": []}',
    ]:
        with pytest.raises(FormatError):
            Envelope.from_json(text)


def test_generated_private_key_is_private_and_listed(tmp_path: Path):
    ring = Keyring(tmp_path)
    info = ring.generate("alice")
    assert stat.S_IMODE(os.stat(tmp_path / "alice.key").st_mode) == 0o600
    assert [(k.name, k.keyid, k.has_private) for k in ring.list()] == [("alice", info.keyid, True)]
    with pytest.raises(KeyringError, match="already exists"):
        ring.generate("alice")
    with pytest.raises(KeyringError, match="invalid key name"):
        ring.generate("../evil")


def test_encrypted_key_needs_the_right_passphrase(tmp_path: Path):
    ring = Keyring(tmp_path)
    assert ring.generate("sealed", b"correct horse").encrypted
    assert b"ENCRYPTED" in (tmp_path / "sealed.key").read_bytes()
    assert ring.signer("sealed", b"correct horse").name == "sealed"
    with pytest.raises(KeyringError, match="wrong passphrase"):
        ring.signer("sealed", b"wrong")
    with pytest.raises(KeyringError, match="is encrypted"):
        ring.signer("sealed")


def test_keys_cli_generate_list_export_import(run, tmp_path: Path):
    result = run("keys", "generate", "bob", "--passphrase-env", "BOB_PASS", env={"BOB_PASS": "s3cret"})
    assert result.exit_code == 0, result.output
    listing = run("keys", "list")
    assert "bob" in listing.stdout and "private, encrypted" in listing.stdout
    pem = run("keys", "export", "bob").stdout
    (tmp_path / "bob.pub").write_text(pem)
    other = tmp_path / "other"
    result = run("keys", "import", "bob", tmp_path / "bob.pub", "--keys-dir", other)
    assert result.exit_code == 0
    assert isinstance(next(iter(Keyring(other).trusted().values())), TrustedKey)
    assert not (other / "bob.key").exists()


def test_keys_cli_missing_passphrase_variable_is_one_line_exit_2(run):
    result = run("keys", "generate", "carol", "--passphrase-env", "NOT_SET_ANYWHERE")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "revreg: error: environment variable NOT_SET_ANYWHERE is not set: it must hold the key passphrase"
    )
