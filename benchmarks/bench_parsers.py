"""Cost of hostile inputs to the parsers, as a ratio against a benign input of the same kind
parsed in the same run: a backtracking PEFT pattern against a plain one, a header with a
thousand-dimension or huge-dimension shape against a normal header. Bounded parsing means the
hostile ratio stays small whatever the input's size.

    python benchmarks/bench_parsers.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from revreg.artifacts.peft_io import _pattern_value
from revreg.artifacts.safetensors_io import parse_header
from revreg.errors import RevregError


def _seconds(call: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        with contextlib.suppress(RevregError):
            call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _header(shape: str) -> Callable[[], object]:
    raw = ('{"t":{"dtype":"U8","shape":' + shape + ',"data_offsets":[0,8]}}').encode()
    data = len(raw).to_bytes(8, "little") + raw + b"\0" * 8
    return lambda: parse_header(data, len(data), "bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    plain_pattern = _seconds(lambda: _pattern_value({"c_attn": 4}, "h.0.attn.c_attn", 8, "rank_pattern"), args.repeat)
    hostile_pattern = _seconds(lambda: _pattern_value({"(a|aa)+": 4}, "a" * 60 + "b", 8, "rank_pattern"), args.repeat)
    plain_header = _seconds(_header("[8]"), args.repeat)
    rank = _seconds(_header("[" + ",".join(["2"] * 16000) + "]"), args.repeat)
    huge = _seconds(_header("[" + ",".join(["9" * 60] * 100) + "]"), args.repeat)
    result = {
        "pattern_plain_s": plain_pattern,
        "pattern_backtracking_s": hostile_pattern,
        "header_plain_s": plain_header,
        "header_rank_16000_s": rank,
        "header_rank_16000_ratio": rank / plain_header,
        "header_100_dims_of_60_digits_s": huge,
        "header_huge_dims_ratio": huge / plain_header,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
