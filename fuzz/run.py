"""Long fuzzing campaign over every parser: the test suite's properties with a larger budget.

    REVREG_FUZZ_EXAMPLES=5000 python fuzz/run.py [--out bench-out/fuzz.json]

Prints, per parser, how many inputs were tried and how many ended in a clean revreg error; any
other exception (a crash) fails the run and is printed by Hypothesis with the input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("REVREG_FUZZ_EXAMPLES", "2000")

from tests import test_fuzz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out") / "fuzz.json")
    args = parser.parse_args()
    start = time.perf_counter()
    properties = [getattr(test_fuzz, n) for n in dir(test_fuzz) if n.startswith("test_")]
    for prop in properties:
        prop()
        print(f"{prop.__name__}: ok", flush=True)
    report = {
        "examples_per_property": int(os.environ["REVREG_FUZZ_EXAMPLES"]),
        "properties": len(properties),
        "seconds": round(time.perf_counter() - start, 1),
        "parsers": {
            name: {"inputs": n, "refused_cleanly": test_fuzz.REFUSED[name], "crashes": 0}
            for name, n in sorted(test_fuzz.CASES.items())
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
