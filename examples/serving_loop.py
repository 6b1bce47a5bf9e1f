"""A serving loop that keeps one base model loaded and switches behaviors per request.

    python examples/serving_loop.py --registry .revreg --base ./my-base-model \
        --behavior support-tone:1.0.0 --behavior legal-tone:2.1.0 --requests requests.jsonl

Each line of the requests file is a JSON object: {"behavior": "support-tone:1.0.0" or null,
"input_ids": [[...]]}. Behaviors come from the registry verified (digest, signature,
certification); attaching refuses a base they were not made for. After the last request the
process proves the base is bit for bit what it loaded, however many switches ran.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

import revreg


def serve(
    model: nn.Module, behaviors: Mapping[str, revreg.Behavior], requests: Iterable[tuple[str | None, torch.Tensor]]
) -> Iterator[torch.Tensor]:
    """Answer each (behavior ref or None, input_ids) with the model's first output tensor."""
    for ref, input_ids in requests:
        with torch.inference_mode():
            if ref is None:
                yield _first(model(input_ids=input_ids))
                continue
            with revreg.attach(model, behaviors[ref]):  # base check from cache: no hashing per request
                yield _first(model(input_ids=input_ids))


def _first(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else output[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", default=None, help="registry location (default $REVREG_REGISTRY, else .revreg)")
    parser.add_argument("--base", required=True, help="base model: directory, org/name[@rev], or weights file")
    parser.add_argument("--factory", default=None, help="package.module:function for a weights file")
    parser.add_argument("--behavior", action="append", default=[], help="a behavior ref to serve (repeatable)")
    parser.add_argument("--requests", required=True, help="JSON lines file of requests")
    args = parser.parse_args(argv)

    registry = revreg.open_registry(args.registry)
    behaviors = {ref: registry.pull(ref) for ref in args.behavior}
    model = revreg.load_base(args.base, factory=args.factory)
    proof = revreg.snapshot(model)
    with open(args.requests, encoding="utf-8") as fh:
        requests = [json.loads(line) for line in fh if line.strip()]
    unknown = sorted({r["behavior"] for r in requests if r["behavior"] is not None} - behaviors.keys())
    if unknown:
        print(f"serving_loop: requests name behaviors not loaded: {', '.join(unknown)}", file=sys.stderr)
        return 2
    stream = ((r["behavior"], torch.tensor(r["input_ids"])) for r in requests)
    for request, out in zip(requests, serve(model, behaviors, stream), strict=True):
        print(json.dumps({"behavior": request["behavior"], "argmax": out[..., -1, :].argmax(-1).tolist()}))
    proof.verify(model)  # raises revreg.RollbackError if any switch left a trace
    print(f"{len(requests)} requests, base restored bit for bit", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
