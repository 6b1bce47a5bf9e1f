"""The certification use case: pin a version, run the verifier on exactly those bytes, sign the
result and record it. Used by `revreg certify`, `revreg worker` and `revreg demo` alike; it
depends on the registry interface and the verifier, and neither of those depends on it."""
