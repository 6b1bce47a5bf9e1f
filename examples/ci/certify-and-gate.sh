#!/usr/bin/env bash
# Push, certify and gate one behavior, then write the audit report. The GitHub Actions and
# GitLab CI examples beside this file call it, and the test suite runs it as it is.
#
# Environment:
#   REVREG_REGISTRY  registry directory or database URL (shared by the pipeline's jobs)
#   REVREG_KEYS      keyring holding the verifier's private key
#   ARTIFACT         the signed behavior artifact (.safetensors) to release
#   REF              its NAME:VERSION
#   BASE             the base model: a Hugging Face directory, or a weights file with FACTORY
#   FACTORY          optional: module:function that builds the model for a weights file
#   PROBES           probe set name in the registry, or a probe set file
#   VERIFIER_KEY     keyring name of the verifier key (trusted as verifier by the registry)
#   POLICY           the release policy (TOML)
#   REPORT_DIR       where JUnit XML and the audit report go
#   DEVICE           optional: cpu (default) or cuda
set -euo pipefail
mkdir -p "$REPORT_DIR"

revreg push "$ARTIFACT"
# A failed certification is recorded (the version becomes rejected); the gate then fails on it.
revreg certify "$REF" --base "$BASE" ${FACTORY:+--factory "$FACTORY"} --probes "$PROBES" \
  --key "$VERIFIER_KEY" --device "${DEVICE:-cpu}" --baseline merge || echo "certification did not pass"
status=0
revreg gate "$REF" --policy "$POLICY" --junit "$REPORT_DIR/revreg-gate.xml" || status=$?
revreg audit report --behavior "${REF%%:*}" -o "$REPORT_DIR/audit-report.html"
exit "$status"
