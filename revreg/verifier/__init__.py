"""The verifier: attach/unload engine, model loading, the load-run-unload protocol, metrics
and certification. The only part of revreg (with live-tensor hashing) that imports torch."""
