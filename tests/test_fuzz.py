"""Property-based fuzzing of every parser, on a fixed budget: arbitrary and mutated inputs end
in a clean revreg error (or a valid result), never another exception. fuzz/run.py runs the
same targets for much longer."""

from __future__ import annotations

import json
import os
import struct
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from revreg.errors import RevregError
from tests import fuzz_targets as t

# The suite's fixed budget; fuzz/run.py raises it through REVREG_FUZZ_EXAMPLES.
BUDGET = settings(
    max_examples=int(os.environ.get("REVREG_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
CASES: Counter[str] = Counter()  # inputs tried per parser
REFUSED: Counter[str] = Counter()  # of which ended in a clean revreg error
GOLDEN = t.golden_bytes()
HEADER = t.golden_header_json()
PROBES = t.golden_probes()


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8)


def _clean(target, *args) -> None:
    CASES[target.__name__] += 1
    try:
        target(*args)
    except RevregError:
        REFUSED[target.__name__] += 1


@BUDGET
@given(st.binary(max_size=4096))
def test_random_bytes_as_safetensors_header(data: bytes):
    _clean(t.safetensors_header, data)


@BUDGET
@given(st.binary(max_size=64).map(lambda b: struct.pack("<Q", len(b)) + b) | st.binary(max_size=64))
def test_short_headers_with_plausible_lengths(data: bytes):
    _clean(t.safetensors_header, data)


@BUDGET
@given(edits)
def test_mutated_artifact_is_refused_or_identical(e):
    data = _mutate(GOLDEN, e)
    CASES["artifact_file"] += 1
    try:
        t.artifact_file(data)
    except RevregError:
        REFUSED["artifact_file"] += 1
        return
    assert data == GOLDEN  # only an unchanged file may verify


@BUDGET
@given(st.integers(0, len(GOLDEN) - 1), st.integers(1, len(GOLDEN)))
def test_truncated_or_extended_artifact_is_refused(cut: int, extra: int):
    for data in (GOLDEN[:cut], GOLDEN + b"\0" * extra):
        CASES["artifact_file"] += 1
        try:
            t.artifact_file(data)
        except RevregError:
            REFUSED["artifact_file"] += 1
            continue
        raise AssertionError("a truncated or extended artifact verified")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@BUDGET
@given(json_values)
def test_arbitrary_json_as_manifest_envelope_and_attestation(value):
    data = json.dumps(value).encode()
    for target in (t.manifest, t.envelope, t.attestation):
        _clean(target, data)


@BUDGET
@given(st.binary(max_size=512))
def test_arbitrary_bytes_as_manifest_envelope_and_attestation(data: bytes):
    for target in (t.manifest, t.envelope, t.attestation):
        _clean(target, data)


@BUDGET
@given(edits)
def test_mutated_header_json_as_manifest_and_envelope(e):
    header = json.loads(HEADER)["__metadata__"]
    for key, target in (("revreg.manifest", t.manifest), ("revreg.signature", t.envelope)):
        _clean(target, _mutate(header[key].encode(), e))


# The review's crashing shapes: numbers that overflow, integers past Python's 4,300-digit limit,
# lone surrogates, wrong types, spliced into every number and string of real documents.
EXTREME = ["1e999", "-1e999", "9" * 5000, "-" + "9" * 70, '"\\ud800"', "true", "null", "[]", "{}", '"x"', "0", "-0.0"]
_TENSORS = json.dumps(
    {
        "algorithm": "sha256",
        "chunk_size": 1 << 24,
        "tensors": [{"name": "w", "dtype": "F32", "shape": [2, 3], "nbytes": 24, "digest": "ab" * 32}],
    }
)
_PROBES = json.dumps(
    {
        "schema": "revreg.probes/v1",
        "name": "p",
        "inputs": ["input_ids"],
        "output": "logits",
        "divergence": "kl",
        "mask": None,
        "batch_size": 4,
        "count": 8,
        "prompts": [],
        "source": {},
    }
)


def _splice(doc: str, position: int, token: str) -> str:
    """Replace the JSON scalar at (or after) `position` with `token`."""
    import re

    scalars = list(re.finditer(r'-?\d+(\.\d+)?([eE][-+]?\d+)?|"[^"]*"|true|false|null', doc))
    if not scalars:
        return doc
    m = scalars[position % len(scalars)]
    return doc[: m.start()] + token + doc[m.end() :]


@BUDGET
@given(st.integers(0, 200), st.sampled_from(EXTREME), st.sampled_from(["tensors", "probes", "manifest", "envelope"]))
def test_extreme_values_in_every_field_of_every_document(position: int, token: str, which: str):
    header = json.loads(HEADER)["__metadata__"]
    doc, target = {
        "tensors": (_TENSORS, t.tensor_manifest),
        "probes": (_PROBES, t.probe_manifest),
        "manifest": (header["revreg.manifest"], t.manifest),
        "envelope": (header["revreg.signature"], t.envelope),
    }[which]
    _clean(target, _splice(doc, position, token).encode())


toml_keys = st.sampled_from(
    [
        "publishers",
        "verifiers",
        "device",
        "min_cycles",
        "bitwise",
        "min_effect",
        "probe_set",
        "max_age",
        "no_revoked_keys",
        "other",
        "policy",
    ]
)
toml_values = st.sampled_from(
    ['"cpu"', '"cuda"', "3", "-1", "true", "1e-6", '["a"]', "[1, 2]", '"30d"', '"x"', "{}", "nan", '"9999999999d"']
)


@BUDGET
@given(st.lists(st.tuples(toml_keys, toml_values), max_size=6), st.booleans(), st.text(max_size=40))
def test_policy_files(entries, table: bool, noise: str):
    text = ("[policy]\n" if table else "") + "".join(f"{k} = {v}\n" for k, v in entries)
    _clean(t.policy, text)
    _clean(t.policy, text + noise)


@BUDGET
@given(edits)
def test_mutated_probe_sets(e):
    _clean(t.probe_file, _mutate(PROBES, e))


peft_configs = st.fixed_dictionaries(
    {"peft_type": st.sampled_from(["LORA", "IA3", "lora", None, 3])},
    optional={
        "r": json_values,
        "lora_alpha": json_values,
        "use_rslora": json_values,
        "bias": json_values,
        "rank_pattern": json_values,
        "alpha_pattern": json_values,
        "use_dora": json_values,
        "modules_to_save": json_values,
    },
)


@BUDGET
@given(peft_configs, st.binary(max_size=256))
def test_peft_configs_and_weights(config, weights: bytes):
    _clean(t.peft_config, config, weights)
