"""The one-pass checks (artifacts.stream through store.Pipeline) against the file-based ones
(open_artifact + verify_artifact): for every damaged or hostile input, fed in any chunking, the
stream refuses exactly when the file checks refuse, and accepts exactly the same artifact."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from revreg.artifacts.artifact import Attachment, open_artifact, pack, verify_artifact
from revreg.artifacts.keys import Keyring
from revreg.artifacts.stream import ArtifactStream
from revreg.errors import RevregError
from revreg.registry.store import BLOCK, Pipeline, copy_hashing, digest_of


@pytest.fixture(scope="module", params=["blake3", "sha256"])
def signed(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> tuple[bytes, dict]:
    """A signed artifact whose tensors cross chunk (16 MiB) and block (4 MiB) boundaries, with a
    0-byte tensor, and the keys that trust its signer; its tensors digest in each algorithm
    `pack` can sign (the stream must hash with the one the manifest names)."""
    d = tmp_path_factory.mktemp("stream")
    ring = Keyring(d / "keys")
    ring.generate("alice")
    rng = np.random.default_rng(0)
    big = rng.standard_normal((17 << 20) // 4 + 3).astype("<f4").tobytes()
    small = rng.standard_normal(5).astype("<f4").tobytes()
    tensors = {
        "a.steer_vector": ("F32", (len(big) // 4,), big),
        "b.steer_vector": ("F32", (5,), small),
        "c.steer_vector": ("F32", (0,), b""),
    }
    atts = tuple(Attachment(t, "steer", {"vector": f"{t}.steer_vector"}) for t in ("a", "b", "c"))
    pack(
        d / "x.safetensors",
        tensors,
        atts,
        name="x",
        version="1.0.0",
        base="sha256:" + "ab" * 32,
        signer=ring.signer("alice"),
        created="2026-01-01T00:00:00Z",
        tensor_hash=request.param,
    )
    return (d / "x.safetensors").read_bytes(), ring.trusted()


def _by_file(data: bytes, tmp: Path, trusted: dict) -> tuple[str, str] | str:
    path = tmp / "f.safetensors"
    path.write_bytes(data)
    try:
        verified = verify_artifact(open_artifact(path), trusted)
    except RevregError as exc:
        return type(exc).__name__
    return verified.digest, verified.manifest.tensors_digest


def _by_stream(
    data: bytes, chunks: list[int], trusted: dict, known_size: bool, lend: bool = False
) -> tuple[str, str] | str:
    """`lend`: every other chunk is lent (`Pipeline.lend`, as the server does) instead of copied,
    alone or as a batch of pieces (with an empty one among them), so lent chunks, lent batches
    and gathered blocks interleave."""
    from revreg.artifacts.artifact import verify_signature

    stream = ArtifactStream("s", len(data) if known_size else None, lambda a: verify_signature(a, trusted))
    sink = io.BytesIO()
    pipe = Pipeline(sink, tap=stream)
    try:
        view, at = memoryview(data), 0
        for i, size in enumerate(chunks):
            if lend and i % 4 == 0:
                assert pipe.lend(bytes(view[at : at + size]), wait=False)
            elif lend and i % 4 == 2:
                half = at + size // 2
                assert pipe.lend([bytes(view[at:half]), b"", bytes(view[half : at + size])], wait=False)
            else:
                pipe.write(view[at : at + size])
            at += size
        if lend:
            pipe.lend(bytes(view[at:]))
        else:
            pipe.write(view[at:])
        digest, _ = pipe.close()
        artifact = stream.finish()
    except RevregError as exc:
        return type(exc).__name__
    finally:
        pipe.abort()
    assert sink.getvalue() == data  # what was written is what was checked
    return digest, artifact.manifest.tensors_digest


def _damaged(data: bytes, rng: random.Random) -> list[bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    out = [b"", data[:7], data[:8], data[: 8 + n], data[: 8 + n + 1], data[:-1], data + b"\0", data + data[:100]]
    out += [struct.pack("<Q", 0) + data[8:], struct.pack("<Q", 2**63) + data[8:], struct.pack("<Q", n - 1) + data[8:]]
    out += [struct.pack("<Q", len(data)) + data[8:], b"\0" * len(data)]
    for region in (range(0, 8), range(8, 8 + n), range(8 + n, len(data))):
        for _ in range(3):
            flipped = bytearray(data)
            flipped[rng.choice(region)] ^= 1 << rng.randrange(8)
            out.append(bytes(flipped))
    return out


def test_stream_and_file_checks_agree_on_every_damaged_input(signed, tmp_path: Path):
    data, trusted = signed
    rng = random.Random(7)
    cases = [data, *_damaged(data, rng)]
    assert _by_file(data, tmp_path, trusted) == _by_stream(data, [], trusted, True)
    for case in cases:
        expected = _by_file(case, tmp_path, trusted)
        for chunks in ([], [1] * 9, [7, 4093, 1 << 20], [BLOCK - 1, 3]):
            for known_size, lend in ((True, False), (False, False), (True, True)):
                got = _by_stream(case, chunks, trusted, known_size, lend)
                if isinstance(expected, str):
                    assert isinstance(got, str), (len(case), chunks, known_size, lend, got)
                else:
                    assert got == expected, (len(case), chunks, known_size, lend)


def test_an_untrusted_signer_is_refused_before_any_tensor_byte(signed, tmp_path: Path):
    from revreg.artifacts.artifact import verify_signature

    data, _ = signed
    other = Keyring(tmp_path / "other")
    other.generate("eve")
    stream = ArtifactStream("s", len(data), lambda a: verify_signature(a, other.trusted()))
    pipe = Pipeline(None, tap=stream)
    with pytest.raises(RevregError):
        for at in range(0, len(data), 4096):
            pipe.write(data[at : at + 4096])
        pipe.close()
    pipe.abort()
    assert stream._leaves == [] and stream._chunk is None  # no tensor byte was hashed


def test_pipeline_matches_plain_hashing_on_odd_sizes(tmp_path: Path):
    for size in (0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5):
        payload = random.Random(size).randbytes(size)
        src = tmp_path / f"s{size}"
        src.write_bytes(payload)
        with open(src, "rb") as fh, open(tmp_path / "d", "w+b", buffering=0) as sink:
            digest, n = copy_hashing(fh, sink, durable=True)
        assert n == size and (tmp_path / "d").read_bytes() == payload
        with open(src, "rb") as fh:
            assert digest_of(fh) == (digest, size)


def test_a_durable_copy_flushes_as_it_goes(tmp_path: Path):
    """fdatasync every FLUSH_EVERY bytes while the copy runs, so the final fsync waits for the
    last stretch only."""
    from revreg.registry.store import FLUSH_EVERY

    size = 2 * FLUSH_EVERY + BLOCK
    with open(tmp_path / "d", "w+b", buffering=0) as sink:
        pipe = Pipeline(sink, durable=True)
        chunk = bytes(BLOCK)
        for _ in range(size // BLOCK):
            pipe.write(chunk)
        pipe.close()
    assert pipe.flushes == 2 and (tmp_path / "d").stat().st_size == size


def _held_by_its_tap() -> tuple[Pipeline, io.BytesIO, threading.Event, list[bytes]]:
    """A pipeline whose tap holds every block until `gate` is set: (pipe, sink, gate, what the
    tap saw)."""
    gate = threading.Event()
    seen: list[bytes] = []

    def slow_tap(view: memoryview) -> None:
        gate.wait()
        seen.append(bytes(view))

    sink = io.BytesIO()
    return Pipeline(sink, tap=slow_tap), sink, gate, seen


def test_lent_chunks_are_bounded_and_given_back(tmp_path: Path):
    """At most LENT_BLOCKS chunks are lent at once (without waiting, the next is refused until
    the stages are done with one); every lent chunk comes back, and the bytes written are the
    bytes lent, in order."""
    from revreg.registry.store import LENT_BLOCKS

    pipe, sink, gate, seen = _held_by_its_tap()
    chunks = [bytes([i]) * (1000 + i) for i in range(LENT_BLOCKS + 1)]
    try:
        assert all(pipe.lend(c, wait=False) for c in chunks[:LENT_BLOCKS])
        assert not pipe.lend(chunks[-1], wait=False)  # the tap holds every lent chunk
        gate.set()
        assert pipe.lend(chunks[-1])  # waits until one is given back
        digest, size = pipe.close()
    finally:
        pipe.abort()
    data = b"".join(chunks)
    assert sink.getvalue() == data and b"".join(seen) == data and size == len(data)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert pipe._left == {}  # nothing of a lent chunk is kept


def test_the_same_bytes_object_lent_twice_at_once_is_counted_twice():
    """uvicorn can hand over one shared object twice (every 1-byte bytes value is one object in
    CPython): each loan is its own block, and every stage sees every byte."""
    pipe, sink, gate, seen = _held_by_its_tap()
    one = b"A"
    try:
        for chunk in (one, one, b"BC", one):
            assert pipe.lend(chunk, wait=False)
        gate.set()
        digest, size = pipe.close()
    finally:
        pipe.abort()
    assert sink.getvalue() == b"AABCA" and b"".join(seen) == b"AABCA" and size == 5
    assert digest == "sha256:" + hashlib.sha256(b"AABCA").hexdigest()
    assert all(t.is_alive() is False for t in pipe._threads) and pipe._left == {}


def test_only_immutable_bytes_are_lent(tmp_path: Path):
    """A lent buffer is hashed and written later, on other threads: a bytearray or a view could
    change in between, so lend refuses them (write copies them instead), alone or in a batch."""
    sink = io.BytesIO()
    pipe = Pipeline(sink)
    try:
        for bad in (bytearray(b"ab"), memoryview(b"ab"), [b"ab", bytearray(b"cd")], "ab", [b"a", 1]):
            with pytest.raises(TypeError, match="takes bytes objects"):
                pipe.lend(bad)  # type: ignore[arg-type]
        assert pipe.lend([b"", b""]) and pipe.lend([b"x", b"x", b"y"]) and pipe.lend((b"z",))
        assert pipe.close() == ("sha256:" + hashlib.sha256(b"xxyz").hexdigest(), 4)
        assert sink.getvalue() == b"xxyz"
    finally:
        pipe.abort()


def test_a_closed_pipeline_takes_no_more_bytes():
    """After close (or abort) the stages have stopped: bytes handed over would be dropped while
    the digest and size said otherwise, so lend, write and submit refuse; close again repeats."""
    sink = io.BytesIO()
    pipe = Pipeline(sink)
    pipe.lend(b"abc")
    result = pipe.close()
    for hand_over in (lambda: pipe.lend(b"def"), lambda: pipe.write(b"def"), lambda: pipe.buffer()):
        with pytest.raises(ValueError, match="closed"):
            hand_over()
    assert pipe.close() == result == ("sha256:" + hashlib.sha256(b"abc").hexdigest(), 3)
    assert sink.getvalue() == b"abc"
    aborted = Pipeline(None)
    aborted.abort()
    with pytest.raises(ValueError, match="closed"):
        aborted.lend(b"x")
