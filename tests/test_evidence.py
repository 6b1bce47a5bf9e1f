"""The evidence chain, attacked: every way the independent review talked revreg's evidence
around, on SQLite, PostgreSQL and (where it applies) over HTTP. Each test failed on the code
before the fix."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from revreg.artifacts.artifact import SIGNATURE_KEY, open_artifact, read_tensors, verify_artifact
from revreg.artifacts.attestation import PAYLOAD_TYPE, sign_certification, statement, verify_certification
from revreg.artifacts.dsse import Envelope, sign
from revreg.artifacts.keys import Keyring
from revreg.artifacts.safetensors_io import read_header, write_safetensors
from revreg.errors import FormatError, IntegrityError, RevregError
from revreg.registry.api import ConflictError, GateError, RegistryAPI, StateError, VersionInfo
from tests.conftest import Backend, make_artifact, minimal_predicate


def _trust(api: RegistryAPI, keys_dir: Path) -> None:
    ring = Keyring(keys_dir)
    api.trust_key(ring.public_pem("alice"), "alice", "publisher")
    api.trust_key(ring.public_pem("vera"), "vera", "verifier")


def _cert(info: VersionInfo, keys_dir: Path, verdict: str, at: str) -> bytes:
    return sign_certification(
        info.ref, info.digest, minimal_predicate(info.digest, verdict, at), Keyring(keys_dir).signer("vera")
    )


T0, T1, T2, T3 = (f"2026-12-01T0{h}:00:00Z" for h in (1, 2, 3, 4))


# -- certify signs what it ran ---------------------------------------------------------------
def test_a_statement_whose_predicate_names_another_behavior_is_never_accepted(
    backend: Backend, keys_dir: Path, tmp_path: Path
):
    api = backend.api
    _trust(api, keys_dir)
    v1 = api.push(make_artifact(tmp_path / "1.safetensors", keys_dir, "1.0.0")).version
    v2 = api.push(make_artifact(tmp_path / "2.safetensors", keys_dir, "2.0.0", seed=3)).version
    # What the review built: subject v2, predicate "I ran v1", signed by a trusted verifier.
    forged = sign(
        statement(v2.ref, v2.digest, minimal_predicate(v1.digest)), PAYLOAD_TYPE, Keyring(keys_dir).signer("vera")
    ).to_json()
    with pytest.raises(FormatError, match="predicate says the verifier ran"):
        api.record_certification(v2.pinned, forged)
    with pytest.raises(FormatError, match="predicate says the verifier ran"):
        sign_certification(v2.ref, v2.digest, minimal_predicate(v1.digest), Keyring(keys_dir).signer("vera"))
    assert api.resolve(v2.ref).state == "pending"
    with pytest.raises(StateError):
        api.publish(v2.ref)


# -- the newest verdict wins -------------------------------------------------------------------
def test_an_older_pass_never_outweighs_a_newer_fail(backend: Backend, keys_dir: Path, tmp_path: Path):
    api = backend.api
    _trust(api, keys_dir)
    info = api.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    old_pass = _cert(info, keys_dir, "PASS", T1)
    assert api.record_certification(info.pinned, old_pass).state == "certified"
    assert api.record_certification(info.pinned, _cert(info, keys_dir, "FAIL", T2)).state == "rejected"
    # The review's replay: the old PASS posted again. Already recorded: nothing changes.
    assert api.record_certification(info.pinned, old_pass).state == "rejected"
    # Another PASS, signed but finished before the FAIL: older evidence changes nothing.
    with pytest.raises(StateError, match="has a newer certification"):
        api.record_certification(info.pinned, _cert(info, keys_dir, "PASS", T0))
    assert api.resolve(info.ref).state == "rejected"
    with pytest.raises(StateError, match="rejected"):
        api.publish(info.ref)
    assert len(api.show(info.ref).certifications) == 2
    # A new run that passes is the way back.
    assert api.record_certification(info.pinned, _cert(info, keys_dir, "PASS", T3)).state == "certified"
    assert api.publish(info.ref).state == "published"


def test_a_newer_fail_withdraws_a_published_version_from_pull(backend: Backend, keys_dir: Path, tmp_path: Path):
    api = backend.api
    _trust(api, keys_dir)
    info = api.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    api.record_certification(info.pinned, _cert(info, keys_dir, "PASS", T1))
    api.publish(info.ref)
    api.record_certification(info.pinned, _cert(info, keys_dir, "FAIL", T2))
    with pytest.raises(GateError, match="newest certification.*says FAIL"):
        api.pull(info.ref, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_the_publish_gate_reads_the_newest_certification_not_any_pass(keys_dir: Path):
    from revreg.registry.policy import RequirePassingCertification

    ring = Keyring(keys_dir)
    ring.generate("vera")
    digest = "sha256:" + "ab" * 32
    signer = ring.signer("vera")
    older_pass = sign_certification("x:1", digest, minimal_predicate(digest, "PASS", T1), signer).decode()
    newer_fail = sign_certification("x:1", digest, minimal_predicate(digest, "FAIL", T2), signer).decode()
    gate = RequirePassingCertification()
    # Whatever the record order, the FAIL finished last.
    for envelopes in ([older_pass, newer_fail], [newer_fail, older_pass]):
        with pytest.raises(GateError, match="says FAIL"):
            gate.verify("x:1", digest, envelopes, ring.trusted())


# -- the CI gate reads state -------------------------------------------------------------------
def _gated(backend: Backend, run, keys_dir: Path, tmp_path: Path) -> tuple[dict[str, str], Path, VersionInfo]:
    _trust(backend.api, keys_dir)
    info = backend.api.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    backend.api.record_certification(info.pinned, _cert(info, keys_dir, "PASS", T1))
    policy = tmp_path / "policy.toml"
    policy.write_text('[policy]\nverifiers = ["vera"]\nmax_age = "3650d"\n')
    env = {"REVREG_REGISTRY": backend.location, **backend.env}
    assert run("gate", info.ref, "--policy", policy, env=env).exit_code == 0
    return env, policy, info


def test_the_gate_fails_a_yanked_version(backend: Backend, run, keys_dir: Path, tmp_path: Path):
    env, policy, info = _gated(backend, run, keys_dir, tmp_path)
    backend.api.publish(info.ref)
    backend.api.yank(info.ref, "bad outputs in production")
    result = run("gate", info.ref, "--policy", policy, env=env)
    assert result.exit_code == 1 and "is yanked; only a certified or published version passes" in result.stdout


def test_the_gate_fails_a_rejected_version(backend: Backend, run, keys_dir: Path, tmp_path: Path):
    env, policy, info = _gated(backend, run, keys_dir, tmp_path)
    backend.api.record_certification(info.pinned, _cert(info, keys_dir, "FAIL", T2))
    result = run("gate", info.ref, "--policy", policy, env=env)
    assert result.exit_code == 1 and "is rejected" in result.stdout


def test_a_revoked_verifier_never_counts_even_without_a_rule(backend: Backend, run, keys_dir: Path, tmp_path: Path):
    env, policy, info = _gated(backend, run, keys_dir, tmp_path)
    policy.write_text("[policy]\n")  # no revocation rule at all
    backend.api.revoke_key("vera", "leaked")
    result = run("gate", info.ref, "--policy", policy, env=env)
    assert result.exit_code == 1
    assert "FAIL  no_revoked_keys  revoked: vera" in result.stdout
    policy.write_text("[policy]\nno_revoked_keys = false\n")
    refused = run("gate", info.ref, "--policy", policy, env=env)
    assert refused.exit_code == 2 and "revoked keys never count" in refused.stderr


def test_a_gate_judged_before_the_certification_fails_max_age(backend: Backend, run, keys_dir: Path, tmp_path: Path):
    env, policy, info = _gated(backend, run, keys_dir, tmp_path)
    result = run("gate", info.ref, "--policy", policy, "--at", "2026-12-01T00:30:00Z", env=env)
    assert (
        result.exit_code == 1 and "FAIL  max_age" in result.stdout and "after the time the gate judges" in result.stdout
    )


# -- revocation is final -----------------------------------------------------------------------
def test_a_revoked_key_cannot_be_trusted_again_in_any_role(backend: Backend, keys_dir: Path, tmp_path: Path):
    api = backend.api
    ring = Keyring(keys_dir)
    api.trust_key(ring.public_pem("alice"), "alice", "publisher")
    api.revoke_key("alice", "left the company")
    for role in ("publisher", "verifier"):
        with pytest.raises(ConflictError, match="revocation is permanent in every role"):
            api.trust_key(ring.public_pem("alice"), "alice-again", role)
    assert set(api.trusted("verifier")) == set()
    # Her certifications would not be evidence either.
    api.trust_key(ring.public_pem("vera"), "vera", "verifier")
    api.trust_key(ring.public_pem("vera"), "vera", "publisher")
    info = api.push(make_artifact(tmp_path / "v.safetensors", keys_dir, key="vera")).version
    by_alice = sign_certification(info.ref, info.digest, minimal_predicate(info.digest), ring.signer("alice"))
    with pytest.raises(RevregError, match="unknown key"):
        api.record_certification(info.pinned, by_alice)


# -- canonical envelopes -----------------------------------------------------------------------
def _rewrap(artifact: Path, out: Path, envelope_text: str) -> Path:
    """The same tensors and manifest with another envelope string in the header."""
    header = read_header(artifact)
    metadata = {**header.metadata, SIGNATURE_KEY: envelope_text}
    write_safetensors(out, read_tensors(artifact), metadata)
    return out


def _variants(text: str) -> dict[str, str]:
    doc = json.loads(text)
    sig = doc["signatures"][0]
    raw = base64.b64decode(sig["sig"])
    return {
        "indented": json.dumps(doc, indent=2, sort_keys=True),
        "reordered keys": json.dumps({k: doc[k] for k in reversed(sorted(doc))}, separators=(",", ":")),
        "unknown field": json.dumps({**doc, "note": "hi"}, sort_keys=True, separators=(",", ":")),
        "bogus second signature": json.dumps(
            {**doc, "signatures": [sig, {"keyid": "x", "sig": "AAAA"}]}, sort_keys=True, separators=(",", ":")
        ),
        "extra field in signature": json.dumps(
            {**doc, "signatures": [{**sig, "cert": ""}]}, sort_keys=True, separators=(",", ":")
        ),
        "url-safe base64": text.replace(sig["sig"], base64.urlsafe_b64encode(raw).decode())
        if base64.urlsafe_b64encode(raw) != base64.b64encode(raw)
        else text.replace(sig["sig"], sig["sig"].rstrip("=")),
        "unpadded base64": text.replace(sig["sig"], sig["sig"].rstrip("=")),
    }


def test_a_rewrapped_envelope_is_refused_everywhere_and_locks_nobody_out(
    backend: Backend, run, keys_dir: Path, tmp_path: Path
):
    _trust(backend.api, keys_dir)
    genuine = make_artifact(tmp_path / "genuine.safetensors", keys_dir)
    text = read_header(genuine).metadata[SIGNATURE_KEY]
    env = {"REVREG_REGISTRY": backend.location, **backend.env}
    for label, variant in _variants(text).items():
        assert variant != text, label
        copy = _rewrap(genuine, tmp_path / f"{label}.safetensors", variant)
        with pytest.raises(FormatError):
            verify_artifact(open_artifact(copy), Keyring(keys_dir).trusted())
        inspected = run("inspect", copy)
        assert inspected.exit_code != 0 and "signature OK" not in inspected.stdout, label
        pushed = run("push", copy, env=env)
        assert pushed.exit_code != 0, label
    # Nothing was taken: the genuine file still pushes as demo:1.0.0.
    assert backend.api.push(genuine).created


def _flips(text: str) -> list[str]:
    """Every base64 character of `text`'s payload and signature, replaced by each character whose
    6-bit value differs in exactly one bit (the whole tamper surface of the envelope's bytes)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    doc = json.loads(text)
    out = []
    for field in (doc["payload"], doc["signatures"][0]["sig"]):
        start = text.index(field)
        for i, ch in enumerate(field):
            if ch == "=":
                continue
            value = alphabet.index(ch)
            for bit in range(6):
                j = start + i
                out.append(text[:j] + alphabet[value ^ (1 << bit)] + text[j + 1 :])
    return out


def test_every_bit_of_every_base64_character_of_an_artifact_envelope_is_refused(keys_dir: Path, tmp_path: Path):
    genuine = make_artifact(tmp_path / "genuine.safetensors", keys_dir)
    trusted = Keyring(keys_dir).trusted()
    text = read_header(genuine).metadata[SIGNATURE_KEY]
    manifest = open_artifact(genuine).manifest.to_bytes()
    flips = _flips(text)
    accepted = []
    for variant in flips:
        try:
            envelope = Envelope.from_json(variant)
            if envelope.payload != manifest:
                raise FormatError("covers a different manifest")
            from revreg.artifacts.dsse import verify

            verify(envelope, envelope.payload_type, trusted)
        except RevregError:
            continue
        accepted.append(variant)
    assert len(flips) > 1000 and accepted == []
    # And end to end through the file, for the signature's characters (the last ones carry the
    # padding bits the review found accepted).
    sig = json.loads(text)["signatures"][0]["sig"]
    for k, variant in enumerate(v for v in flips if sig not in v):
        copy = _rewrap(genuine, tmp_path / f"flip{k % 4}.safetensors", variant)
        with pytest.raises(RevregError):
            verify_artifact(open_artifact(copy), trusted)


def test_every_bit_of_every_base64_character_of_a_certification_is_refused(keys_dir: Path):
    Keyring(keys_dir).generate("vera")
    ring = Keyring(keys_dir)
    digest = "sha256:" + "cd" * 32
    text = sign_certification("x:1", digest, minimal_predicate(digest, "PASS", T1), ring.signer("vera")).decode()
    flips = _flips(text)
    accepted = 0
    for variant in flips:
        try:
            verify_certification(variant, ring.trusted())
            accepted += 1
        except RevregError:
            pass
    assert len(flips) > 1000 and accepted == 0


# -- the evidence can be had, and says what was signed -----------------------------------------
def test_show_json_carries_the_signed_envelopes(backend: Backend, run, keys_dir: Path, tmp_path: Path):
    api = backend.api
    _trust(api, keys_dir)
    info = api.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    envelope = _cert(info, keys_dir, "PASS", T1)
    api.record_certification(info.pinned, envelope)
    shown = run("show", info.ref, "--json", env={"REVREG_REGISTRY": backend.location, **backend.env})
    (cert,) = json.loads(shown.stdout)["certifications"]
    assert cert["envelope"].encode() == envelope
    assert verify_certification(cert["envelope"], Keyring(keys_dir).trusted()).subject_digest == info.digest


# -- smaller holes -----------------------------------------------------------------------------
def test_pull_refuses_bytes_signed_for_another_name_or_version(backend: Backend, keys_dir: Path, tmp_path: Path):
    from sqlalchemy import text

    api = backend.api
    _trust(api, keys_dir)
    a = api.push(make_artifact(tmp_path / "a.safetensors", keys_dir, "1.0.0")).version
    b = api.push(make_artifact(tmp_path / "b.safetensors", keys_dir, "1.1.0", seed=4)).version
    for info in (a, b):
        api.record_certification(info.pinned, _cert(info, keys_dir, "PASS", T1))
        api.publish(info.ref)
    # An edit of the database: demo:1.1.0's row now points at demo:1.0.0's blob.
    with backend.sql.engine.begin() as conn:
        conn.execute(
            text("UPDATE versions SET digest = :a, size = :s WHERE version = '1.1.0'"), {"a": a.digest, "s": a.size}
        )
    with pytest.raises(RevregError):
        api.pull("demo:1.1.0", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_version_and_a_tag_never_share_a_name(backend: Backend, keys_dir: Path, tmp_path: Path):
    api = backend.api
    _trust(api, keys_dir)
    api.push(make_artifact(tmp_path / "a.safetensors", keys_dir, "1.0.0"))
    api.tag("demo:1.0.0", "stable")
    with pytest.raises(StateError, match="would shadow the tag 'stable'"):
        api.push(make_artifact(tmp_path / "s.safetensors", keys_dir, "stable", seed=2))
    assert api.resolve("demo:stable").version == "1.0.0"
    with pytest.raises(RevregError, match="cannot shadow"):
        api.tag("demo:1.0.0", "1.0.0")


@pytest.mark.parametrize("bad", ["demo\n", "demo:1.0.0\n", "de\nmo"])
def test_names_and_versions_are_matched_to_the_end(bad: str):
    from revreg.registry.refs import parse_ref

    with pytest.raises(RevregError):
        parse_ref(bad)


def test_names_with_a_trailing_newline_are_refused_at_pack(keys_dir: Path, tmp_path: Path):
    from revreg.artifacts.artifact import check_name, check_version

    for check, value in ((check_name, "demo\n"), (check_version, "1.0.0\n")):
        with pytest.raises(RevregError):
            check(value)


def test_unpublished_is_not_yanked(backend: Backend, run, keys_dir: Path, tmp_path: Path):
    api = backend.api
    _trust(api, keys_dir)
    info = api.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    api.yank(info.ref, "withdrawn")
    with pytest.raises(StateError, match="--allow-yanked"):
        api.pull(info.ref, tmp_path / "o.safetensors", allow_unpublished=True)
    env = {"REVREG_REGISTRY": backend.location, **backend.env}
    assert run("pull", info.ref, "-o", tmp_path / "o.safetensors", "--allow-yanked", env=env).exit_code == 0
    assert api.audit_log(info.ref)[-1].action == "version.pull-yanked"


def test_verifier_signed_fields_are_escaped_in_the_html_report(backend: Backend, run, keys_dir: Path, tmp_path: Path):
    api = backend.api
    _trust(api, keys_dir)
    info = api.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    hostile = "<script>alert(1)</script>"
    predicate = {
        **minimal_predicate(info.digest, "PASS", T1),
        "device": hostile,
        "cycles": hostile,
        "reasons": [hostile],
        "metric_names": [hostile, hostile],
        "probes": {"name": hostile, "digest": hostile},
        "environment": {hostile: hostile},
        "leakage": {"per_probe": [hostile, 0.1], "threshold": hostile},
        "baselines": [{"baseline": hostile, "leakage_per_probe": [hostile]}],
    }
    envelope = sign_certification(info.ref, info.digest, predicate, Keyring(keys_dir).signer("vera"))
    api.record_certification(info.pinned, envelope)
    out = tmp_path / "report.html"
    result = run("audit", "report", "-o", out, env={"REVREG_REGISTRY": backend.location, **backend.env})
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html


# -- PEFT export says what was signed ----------------------------------------------------------
def _signed_with_provenance(artifact: Path, out: Path, keys_dir: Path, provenance: dict) -> Path:
    """A publisher-signed artifact whose provenance says something else than its attachments:
    what a careless (or hostile) packer outside revreg could produce."""
    from dataclasses import replace

    from revreg.artifacts.artifact import MANIFEST_KEY
    from revreg.artifacts.artifact import PAYLOAD_TYPE as MANIFEST_TYPE

    manifest = replace(open_artifact(artifact).manifest, provenance=provenance)
    payload = manifest.to_bytes()
    envelope = sign(payload, MANIFEST_TYPE, Keyring(keys_dir).signer("alice"))
    metadata = {MANIFEST_KEY: payload.decode(), SIGNATURE_KEY: envelope.to_json().decode()}
    write_safetensors(out, read_tensors(artifact), metadata)
    return out


def test_a_provenance_that_contradicts_the_signed_lora_is_refused_at_pack_push_and_export(
    backend: Backend, run, artifact: Path, keys_dir: Path, tmp_path: Path
):
    from dataclasses import replace

    from revreg.artifacts.artifact import pack
    from revreg.artifacts.peft_io import peft_config_for

    manifest = open_artifact(artifact).manifest
    config = manifest.provenance["peft_config"]
    lying = {**manifest.provenance, "peft_config": {**config, "lora_alpha": 800}}
    with pytest.raises(RevregError, match="contradicts the signed attachments"):
        pack(
            tmp_path / "p.safetensors",
            read_tensors(artifact),
            manifest.attachments,
            name="demo",
            version="9.0.0",
            base=manifest.base,
            signer=Keyring(keys_dir).signer("alice"),
            created=manifest.created,
            provenance=lying,
        )
    forged = _signed_with_provenance(artifact, tmp_path / "forged.safetensors", keys_dir, lying)
    _trust(backend.api, keys_dir)
    with pytest.raises(RevregError, match="contradicts the signed attachments"):
        backend.api.push(forged)
    assert run("inspect", forged).exit_code == 2
    # Export writes the signed scaling whatever a provenance says (older artifacts included).
    exported = peft_config_for(replace(manifest, provenance=lying))
    for a in manifest.attachments:
        assert (exported["alpha_pattern"].get(re_escape(a.target), exported["lora_alpha"])) == a.alpha
    assert peft_config_for(manifest) == config  # a faithful provenance round-trips byte for byte


def test_a_backtracking_pattern_is_cut_off_not_run_to_the_end():
    from revreg.artifacts.peft_io import _pattern_value

    # With Python's re this takes minutes (x1.6 per character); the matcher's time bound ends it
    # with this error (how long that takes is measured in benchmarks/bench_parsers.py).
    with pytest.raises(RevregError, match="takes too long to match"):
        _pattern_value({"(a|aa)+": 4}, "a" * 60 + "b", 8, "rank_pattern")


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"rank_pattern": {"[": 4}}, "not a valid regular expression"),
        ({"rank_pattern": ["c_attn"]}, "must be an object"),
        ({"alpha_pattern": {"c_attn": "8"}}, "must be a finite number"),
        ({"r": "8"}, "must be a finite number"),
        ({"target_modules": ["mlp"]}, "not among the PEFT config's target_modules"),
    ],
)
def test_hostile_peft_configs_are_refused(artifact: Path, keys_dir: Path, tmp_path: Path, patch, fragment):
    manifest = open_artifact(artifact).manifest
    config = {**manifest.provenance["peft_config"], **patch}
    forged = _signed_with_provenance(
        artifact, tmp_path / "f.safetensors", keys_dir, {**manifest.provenance, "peft_config": config}
    )
    with pytest.raises(RevregError, match=fragment):
        verify_artifact(open_artifact(forged), Keyring(keys_dir).trusted())


@pytest.mark.parametrize("number", ["1e999", "-1e999", "9" * 5000])
def test_a_signed_manifest_with_an_extreme_number_is_a_format_error(number: str, keys_dir: Path, tmp_path: Path):
    from revreg.artifacts.artifact import MANIFEST_KEY
    from revreg.artifacts.artifact import PAYLOAD_TYPE as MANIFEST_TYPE

    genuine = make_artifact(tmp_path / "g.safetensors", keys_dir)
    payload = read_header(genuine).metadata[MANIFEST_KEY].replace('"provenance":{}', f'"provenance":{{"x":{number}}}')
    envelope = sign(payload.encode(), MANIFEST_TYPE, Keyring(keys_dir).signer("alice"))
    out = tmp_path / "x.safetensors"
    write_safetensors(out, read_tensors(genuine), {MANIFEST_KEY: payload, SIGNATURE_KEY: envelope.to_json().decode()})
    with pytest.raises(FormatError, match="out of range"):
        open_artifact(out)


def test_exported_certifications_verify_with_securesystemslib(backend: Backend, run, keys_dir: Path, tmp_path: Path):
    """An auditor's own tooling checks the evidence: JSON lines of DSSE envelopes, verified by
    securesystemslib against the verifier's public key under revreg's key id."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from securesystemslib.dsse import Envelope as SslibEnvelope
    from securesystemslib.signer import SSlibKey

    api = backend.api
    _trust(api, keys_dir)
    info = api.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    api.record_certification(info.pinned, _cert(info, keys_dir, "PASS", T1))
    api.record_certification(info.pinned, _cert(info, keys_dir, "FAIL", T2))
    out = tmp_path / "demo.intoto.jsonl"
    env = {"REVREG_REGISTRY": backend.location, **backend.env}
    assert run("attestations", info.ref, "-o", out, env=env).exit_code == 0
    ring = Keyring(keys_dir)
    key = SSlibKey.from_crypto(load_pem_public_key(ring.public_pem("vera")), keyid=ring.signer("vera").keyid)
    verdicts = []
    for line in out.read_text().splitlines():
        envelope = SslibEnvelope.from_dict(json.loads(line))
        assert set(envelope.verify([key], 1)) == {key.keyid}
        statement_doc = json.loads(envelope.payload)
        assert statement_doc["_type"] == "https://in-toto.io/Statement/v1"
        assert "sha256:" + statement_doc["subject"][0]["digest"]["sha256"] == info.digest
        verdicts.append(statement_doc["predicate"]["verdict"])
    assert verdicts == ["PASS", "FAIL"]
    # Standard output by default, the same bytes.
    assert run("attestations", info.ref, env=env).stdout == out.read_text()


# -- the audit log, anchored -------------------------------------------------------------------
def _rewrite_chain(sql, edit_seq: int | None = None, drop_last: bool = False) -> None:
    """What someone with write access to the database can do: change a row (or drop the last),
    then recompute every hash and the head so the chain is consistent again."""
    from sqlalchemy import text as sql_text

    from revreg.registry.audit import GENESIS, entry_hash

    with sql.engine.begin() as conn:
        if drop_last:
            conn.execute(sql_text("DELETE FROM audit_log WHERE seq = (SELECT MAX(seq) FROM audit_log)"))
        if edit_seq is not None:
            conn.execute(sql_text("UPDATE audit_log SET actor = 'someone-else' WHERE seq = :s"), {"s": edit_seq})
        rows = conn.execute(
            sql_text("SELECT seq, at, actor, action, subject, details FROM audit_log ORDER BY seq")
        ).all()
        prev = GENESIS
        for seq, at, actor, action, subject, details in rows:
            h = entry_hash(prev, seq, at, actor, action, subject, details)
            conn.execute(
                sql_text("UPDATE audit_log SET prev_hash = :p, hash = :h WHERE seq = :s"), {"p": prev, "h": h, "s": seq}
            )
            prev = h
        conn.execute(
            sql_text("UPDATE settings SET value = :v WHERE key = 'audit_head'"), {"v": f"{rows[-1][0]}:{prev}"}
        )


@pytest.mark.parametrize("attack", ["edit", "drop-last"])
def test_a_checkpoint_detects_a_consistently_rewritten_chain(
    backend: Backend, run, keys_dir: Path, tmp_path: Path, attack: str
):
    Keyring(keys_dir).generate("auditor")
    env = {"REVREG_REGISTRY": backend.location, **backend.env}
    _trust(backend.api, keys_dir)
    backend.api.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    point = tmp_path / "checkpoint.dsse.json"
    assert run("audit", "checkpoint", "--key", "auditor", "-o", point, env=env).exit_code == 0
    covered = backend.api.audit_verify().rows
    check = ("audit", "verify", "--checkpoint", point, "--checkpoint-key", "auditor")
    assert run(*check, env=env).exit_code == 0
    backend.api.tag("demo:1.0.0", "latest")  # a row after the checkpoint
    if attack == "edit":
        _rewrite_chain(backend.sql, edit_seq=2)
    else:
        _rewrite_chain(backend.sql, drop_last=True)  # the tag row
        _rewrite_chain(backend.sql, drop_last=True)  # and a covered one
    # The chain alone cannot see it: that is the documented limit ...
    alone = run("audit", "verify", env=env)
    assert alone.exit_code == 0 and "chain intact" in alone.stdout
    # ... the checkpoint, kept outside the database, does.
    result = run(*check, env=env)
    assert result.exit_code == 1, result.output
    assert ("rewritten" if attack == "edit" else "rows were deleted") in result.stderr
    assert covered >= 3


def test_a_checkpoint_by_another_key_or_tampered_is_refused(backend: Backend, run, keys_dir: Path, tmp_path: Path):
    ring = Keyring(keys_dir)
    ring.generate("auditor")
    ring.generate("mallory")
    env = {"REVREG_REGISTRY": backend.location, **backend.env}
    _trust(backend.api, keys_dir)
    point = tmp_path / "c.json"
    assert run("audit", "checkpoint", "--key", "mallory", "-o", point, env=env).exit_code == 0
    refused = run("audit", "verify", "--checkpoint", point, "--checkpoint-key", "auditor", env=env)
    assert refused.exit_code != 0 and "unknown key" in refused.stderr
    assert run("audit", "verify", "--checkpoint", point, env=env).exit_code == 2


# -- client-side trust -------------------------------------------------------------------------
def _compromised_server(backend: Backend, keys_dir: Path, tmp_path: Path) -> tuple[VersionInfo, VersionInfo]:
    """A genuine published version, and one that whoever controls the server slipped in: signed
    and certified by a key the server was made to trust."""
    ring = Keyring(keys_dir)
    ring.generate("mallory")
    _trust(backend.api, keys_dir)
    genuine = backend.api.push(make_artifact(tmp_path / "g.safetensors", keys_dir, "1.0.0")).version
    backend.api.record_certification(genuine.pinned, _cert(genuine, keys_dir, "PASS", T1))
    backend.api.publish(genuine.ref)
    backend.sql.trust_key(ring.public_pem("mallory"), "mallory", "publisher")
    backend.sql.trust_key(ring.public_pem("mallory"), "mallory", "verifier")
    bad_file = make_artifact(tmp_path / "m.safetensors", keys_dir, "6.6.6", seed=9, key="mallory")
    bad = backend.sql.push(bad_file).version
    predicate = minimal_predicate(bad.digest, "PASS", T1)
    backend.sql.record_certification(
        bad.pinned, sign_certification(bad.ref, bad.digest, predicate, ring.signer("mallory"))
    )
    backend.sql.publish(bad.ref)
    return genuine, bad


@pytest.mark.parametrize("backend", ["http"], indirect=True)
def test_a_client_with_pinned_keys_refuses_what_a_compromised_server_trusts(
    backend: Backend, keys_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from revreg.registry.remote import RemoteRegistry

    genuine, bad = _compromised_server(backend, keys_dir, tmp_path)
    ring = Keyring(keys_dir)
    # Without pins the client can only check against the server's keys: the documented limit.
    backend.api.pull(bad.ref, tmp_path / "unpinned.safetensors")
    monkeypatch.setenv("REVREG_PIN_PUBLISHERS", ring.signer("alice").keyid)
    monkeypatch.setenv("REVREG_PIN_VERIFIERS", f" {ring.signer('vera').keyid} ,")
    pinned = RemoteRegistry(backend.location, backend.env["REVREG_TOKEN"])
    with pytest.raises(RevregError, match="pinned in REVREG_PIN_VERIFIERS"):
        pinned.pull(bad.ref, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    assert pinned.pull(genuine.ref, tmp_path / "good.safetensors").digest == genuine.digest
    # An unpublished version is not gated, but its signer still has to be pinned.
    backend.sql.trust_key(ring.public_pem("mallory"), "mallory", "publisher")
    other = backend.sql.push(make_artifact(tmp_path / "o.safetensors", keys_dir, "7.0.0", seed=7, key="mallory"))
    with pytest.raises(RevregError, match="unknown key"):
        pinned.pull(other.version.ref, tmp_path / "o-out.safetensors", allow_unpublished=True)


@pytest.mark.parametrize("backend", ["http"], indirect=True)
def test_a_server_that_serves_a_key_under_another_id_is_refused(backend: Backend, keys_dir: Path, tmp_path: Path):
    from sqlalchemy import text

    ring = Keyring(keys_dir)
    ring.generate("mallory")
    _trust(backend.api, keys_dir)
    with backend.sql.engine.begin() as conn:
        conn.execute(
            text("UPDATE keys SET public_pem = :p WHERE name = 'alice'"), {"p": ring.public_pem("mallory").decode()}
        )
    with pytest.raises(IntegrityError, match="but that public key is"):
        backend.api.trusted("publisher")


# -- found by the red team after the first round of fixes ----------------------------------------
def test_a_future_dated_pass_cannot_lock_the_verdict(backend: Backend, keys_dir: Path, tmp_path: Path):
    api = backend.api
    _trust(api, keys_dir)
    info = api.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    for when in ("9999-12-31T23:59:59Z", "not a time", "9999-12-31T23:59:59-01:00"):
        with pytest.raises(FormatError, match="missing, malformed or in the future"):
            api.record_certification(info.pinned, _cert(info, keys_dir, "PASS", when))
    undated = sign_certification(
        info.ref,
        info.digest,
        {"verdict": "PASS", "behavior": {"digest": info.digest}},
        Keyring(keys_dir).signer("vera"),
    )
    with pytest.raises(FormatError, match="finished_at"):
        api.record_certification(info.pinned, undated)
    assert api.resolve(info.ref).state == "pending"


def test_a_revoked_verifiers_evidence_does_not_block_an_honest_verdict(
    backend: Backend, keys_dir: Path, tmp_path: Path
):
    api = backend.api
    ring = Keyring(keys_dir)
    ring.generate("mallory")
    _trust(api, keys_dir)
    api.trust_key(ring.public_pem("mallory"), "mallory", "verifier")
    info = api.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    api.record_certification(info.pinned, _cert(info, keys_dir, "PASS", T1))
    api.publish(info.ref)
    late = sign_certification(info.ref, info.digest, minimal_predicate(info.digest, "PASS", T3), ring.signer("mallory"))
    api.record_certification(info.pinned, late)
    api.revoke_key("mallory", "compromised")
    # vera's FAIL finished before mallory's PASS, but mallory no longer counts.
    api.record_certification(info.pinned, _cert(info, keys_dir, "FAIL", T2))
    with pytest.raises(GateError, match="says FAIL"):
        api.pull(info.ref, tmp_path / "o.safetensors")


def test_a_pass_and_a_fail_in_the_same_second_fail_closed(backend: Backend, keys_dir: Path, tmp_path: Path):
    api = backend.api
    _trust(api, keys_dir)
    info = api.push(make_artifact(tmp_path / "a.safetensors", keys_dir)).version
    fail = _cert(info, keys_dir, "FAIL", T1)
    api.record_certification(info.pinned, fail)
    assert api.record_certification(info.pinned, _cert(info, keys_dir, "PASS", T1)).state == "rejected"
    with pytest.raises(StateError):
        api.publish(info.ref)


def test_a_registry_trusts_ed25519_keys_only(backend: Backend):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(RevregError, match="Ed25519 keys only"):
        backend.api.trust_key(pem, "ecdsa-verifier", "verifier")


@pytest.mark.parametrize("key", [r"h\.1\.attn\.(?:c_atXn){e<=1}", "c_at{2}n", r"(?i)C_ATTN", r"\p{L}+"])
def test_peft_patterns_that_re_and_regex_read_differently_are_refused(
    artifact: Path, keys_dir: Path, tmp_path: Path, key: str
):
    manifest = open_artifact(artifact).manifest
    config = {**manifest.provenance["peft_config"], "alpha_pattern": {key: 3}}
    forged = _signed_with_provenance(
        artifact, tmp_path / "f.safetensors", keys_dir, {**manifest.provenance, "peft_config": config}
    )
    with pytest.raises(RevregError, match="does not evaluate"):
        verify_artifact(open_artifact(forged), Keyring(keys_dir).trusted())


def test_lone_surrogates_are_format_errors(keys_dir: Path, tmp_path: Path):
    from revreg.artifacts.canonical import strict_loads

    for text in ('{"a": "\\ud800"}', '["\\udfff"]', '{"\\ud800": 1}'):
        with pytest.raises(FormatError, match="lone surrogate"):
            strict_loads(text, "test")
    Keyring(keys_dir).generate("vera")
    with pytest.raises(FormatError):
        verify_certification('{"payload":"\\ud800","payloadType":"x","signatures":[]}', Keyring(keys_dir).trusted())


@pytest.mark.parametrize("at", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-05:00"])
def test_gate_times_at_the_edge_of_the_calendar_are_one_line(backend: Backend, run, keys_dir, tmp_path, at: str):
    env, policy, info = _gated(backend, run, keys_dir, tmp_path)
    result = run("gate", info.ref, "--policy", policy, "--at", at, env=env)
    assert result.exit_code == 2 and "within years 1-9999" in result.stderr


@pytest.mark.parametrize("backend", ["http"], indirect=True)
def test_a_lying_server_cannot_hand_out_another_version_or_an_unpublished_one(
    backend: Backend, keys_dir: Path, tmp_path: Path
):
    """The client checks the server's answer itself: same name, the version or digest asked
    for, and a state this pull accepts."""
    from revreg.registry.api import VersionInfo as Info

    api = backend.api
    _trust(api, keys_dir)
    info = api.push(make_artifact(tmp_path / "a.safetensors", keys_dir, "2.0.0")).version
    api.record_certification(info.pinned, _cert(info, keys_dir, "FAIL", T1))
    rejected = api.resolve(info.ref)
    with pytest.raises(StateError, match="rejected, not published"):
        api._check_answer("demo:2.0.0", rejected, False, False)
    with pytest.raises(IntegrityError, match="it answered with demo:2.0.0"):
        api._check_answer("demo:3.0.0", rejected, True, False)
    other = Info(**{**rejected.__dict__, "name": "other"})
    with pytest.raises(IntegrityError):
        api._check_answer("demo", other, True, False)
    yanked = Info(**{**rejected.__dict__, "state": "yanked"})
    with pytest.raises(StateError, match="--allow-yanked"):
        api._check_answer("demo:2.0.0", yanked, True, False)


@pytest.mark.parametrize("backend", ["http"], indirect=True)
def test_server_answers_4xx_to_out_of_range_ids_nul_bytes_and_bad_roles(backend: Backend, keys_dir: Path):
    import httpx

    headers = {"Authorization": f"Bearer {backend.env['REVREG_TOKEN']}"}
    url = backend.location
    for action in ("renew", "complete", "fail"):
        body = {"worker": "w", "lease": 10, "envelope": "{}", "message": "x"}
        r = httpx.post(f"{url}/v1/queue/1180591620717411303424/{action}", json=body, headers=headers)
        assert 400 <= r.status_code < 500, (action, r.status_code)
    for path in ("/v1/probes/digest?ref=p%00", "/v1/audit/log?subject=a%00", "/v1/versions?name=a%00"):
        assert httpx.get(url + path, headers=headers).status_code < 500, path
    r = httpx.post(f"{url}/v1/keys/revoke", json={"key": "a\x00", "reason": "x\x00"}, headers=headers)
    assert 400 <= r.status_code < 500
    assert httpx.get(f"{url}/v1/keys/pem?role=bogus", headers=headers).status_code == 422


def test_a_worker_survives_a_result_the_registry_refuses(backend: Backend, keys_dir: Path, tmp_path: Path, toy):
    """The verifier key is revoked while the worker runs: its request ends failed with the
    reason instead of the worker dying with the request left running."""
    from revreg.certification.worker import process

    api = backend.api
    _trust(api, keys_dir)
    v1 = api.push(toy["artifact"]).version
    probes = api.push_probes(toy["probes"])[0].digest
    api.request_certification(v1.ref, str(toy["base"]), probes, "revreg.verifier.toy:build", cycles=1)
    claimed = api.claim_request("w", 60)
    assert claimed is not None
    api.revoke_key("vera", "rotated mid-run")
    assert process(api, claimed, Keyring(keys_dir).signer("vera"), "w") is None
    (failed,) = api.requests("failed")
    assert failed.id == claimed.id and "the registry refused the result" in (failed.result or "")
    assert api.requests("running") == []


def test_nul_bytes_are_input_errors_on_every_backend(backend: Backend):
    """PostgreSQL text cannot hold NUL: the database's refusal is a clean InputError, never a crash."""
    api = backend.api
    for call in (
        lambda: api.audit_log("a\x00"),
        lambda: api.probe_digest("p\x00"),
        lambda: api.revoke_key("k\x00", "r\x00"),
        lambda: api.ls("a\x00"),
    ):
        try:
            call()
        except RevregError as exc:
            assert exc.exit_code == 2, exc


def test_a_client_recomputes_the_chain_it_is_served(backend: Backend, keys_dir: Path, tmp_path: Path):
    """A checkpoint is checked against rows the client hashes itself, so a server cannot keep the
    signed head while serving rewritten rows before it."""
    from dataclasses import replace

    from revreg.registry.chain import recompute

    _trust(backend.api, keys_dir)
    backend.api.push(make_artifact(tmp_path / "a.safetensors", keys_dir))
    entries = backend.api.audit_log()
    assert recompute(entries) is None
    forged = [*entries[:1], replace(entries[1], actor="someone-else"), *entries[2:]]
    assert "does not hash" in (recompute(forged) or "")
    assert "missing" in (recompute(entries[1:]) or "")
