"""Every parser fails closed and cleanly: the review's crashing inputs, each a one-line
FormatError (exit 2 in the CLI), never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from revreg.artifacts.artifact import MANIFEST_KEY, SIGNATURE_KEY, open_artifact, read_tensors
from revreg.artifacts.probes import MANIFEST_KEY as PROBES_KEY
from revreg.artifacts.probes import read_probes
from revreg.artifacts.safetensors_io import SMALL_HEADER_BYTES, read_header, write_safetensors
from revreg.errors import FormatError


def _with_probe_manifest(probes: Path, out: Path, patch: dict) -> Path:
    doc = json.loads(read_header(probes).metadata[PROBES_KEY])
    write_safetensors(out, read_tensors(probes), {PROBES_KEY: json.dumps({**doc, **patch}, sort_keys=True)})
    return out


@pytest.mark.parametrize(
    "patch", [{"name": 5}, {"batch_size": 2.5}, {"batch_size": True}, {"count": "10"}, {"inputs": [1]}, {"mask": 3}]
)
def test_a_probe_manifest_with_wrong_types_is_a_format_error(toy, tmp_path: Path, patch: dict):
    with pytest.raises(FormatError):
        read_probes(_with_probe_manifest(toy["probes"], tmp_path / "p.safetensors", patch))


def test_a_probe_manifest_with_an_overflowing_number_is_a_format_error(toy, tmp_path: Path):
    doc = read_header(toy["probes"]).metadata[PROBES_KEY].replace('"batch_size":4', '"batch_size":1e999')
    out = tmp_path / "p.safetensors"
    write_safetensors(out, read_tensors(toy["probes"]), {PROBES_KEY: doc})
    with pytest.raises(FormatError, match="out of range"):
        read_probes(out)


@pytest.mark.parametrize("rank", ["0", "-2", "2.5", "true", "null"])
def test_a_lora_rank_flipped_to_zero_or_nonsense_is_a_format_error(artifact: Path, tmp_path: Path, rank: str):
    header = read_header(artifact)
    manifest = header.metadata[MANIFEST_KEY]
    assert '"rank":4' in manifest
    out = tmp_path / "r.safetensors"
    metadata = {
        MANIFEST_KEY: manifest.replace('"rank":4', f'"rank":{rank}', 1),
        SIGNATURE_KEY: header.metadata[SIGNATURE_KEY],
    }
    write_safetensors(out, read_tensors(artifact), metadata)
    with pytest.raises(FormatError, match="rank must be a positive integer|not in canonical form"):
        open_artifact(out)


def test_an_oversized_artifact_header_is_refused_before_it_is_read(tmp_path: Path):
    out = tmp_path / "big.safetensors"
    n = SMALL_HEADER_BYTES + 8
    out.write_bytes(n.to_bytes(8, "little") + b"{" + b" " * (n - 1))
    with pytest.raises(FormatError, match="too large"):
        open_artifact(out)


def test_too_many_tensors_is_a_format_error(tmp_path: Path):
    from revreg.artifacts.safetensors_io import MAX_TENSORS, parse_header

    entries = ",".join(f'"t{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}' for i in range(MAX_TENSORS + 1))
    raw = ("{" + entries + "}").encode()
    with pytest.raises(FormatError, match="over the limit"):
        parse_header(len(raw).to_bytes(8, "little") + raw, 8 + len(raw), "t")


def test_a_shape_written_with_thousands_of_digits_is_refused_at_once(tmp_path: Path):
    from revreg.artifacts.safetensors_io import parse_header

    raw = ('{"t":{"dtype":"U8","shape":[' + "9" * 4000 + '],"data_offsets":[0,0]}}').encode()
    with pytest.raises(FormatError, match="out of range"):
        parse_header(len(raw).to_bytes(8, "little") + raw, 8 + len(raw), "t")


def test_pack_from_an_input_cut_short_is_an_input_error_not_a_crash(tmp_path: Path, keys_dir: Path):
    """Packing reads the input tensors from their file; a file truncated after its header was read
    is an InputError (reading a truncated mapping would kill the process with SIGBUS)."""
    import numpy as np

    from revreg.artifacts.artifact import pack
    from revreg.artifacts.keys import Keyring
    from revreg.artifacts.spec import read_spec
    from revreg.errors import InputError

    data = np.arange(1 << 20, dtype="<f4").tobytes()
    write_safetensors(tmp_path / "t.safetensors", {"v": ("F32", (1 << 20,), data)})
    (tmp_path / "spec.json").write_text(
        json.dumps({"attachments": [{"target": "h", "kind": "steer", "tensors": {"vector": "v"}}]})
    )
    imported, _ = read_spec(tmp_path / "t.safetensors", tmp_path / "spec.json")
    with open(tmp_path / "t.safetensors", "r+b") as fh:
        fh.truncate(4096)
    with pytest.raises(InputError, match="changed while it was being read"):
        pack(
            tmp_path / "out.safetensors", imported.tensors, imported.attachments, name="x", version="1",
            base="sha256:" + "ab" * 32, signer=Keyring(keys_dir).signer("alice"), created="2026-01-01T00:00:00Z",
        )  # fmt: skip
    assert not (tmp_path / "out.safetensors").exists()


def test_a_written_file_whose_tensors_are_not_what_was_signed_never_appears(tmp_path: Path):
    from revreg.errors import InputError

    out = tmp_path / "o.safetensors"
    with pytest.raises(InputError, match="changed while"):
        write_safetensors(out, {"v": ("U8", (4,), b"\0\1\2\3")}, expect="sha256:" + "0" * 64)
    assert not out.exists() and list(tmp_path.iterdir()) == []
