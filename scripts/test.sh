#!/usr/bin/env bash
# Runs Weft's whole test suite: unit tests and the end-to-end cases on the simulated cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The binaries the end-to-end cases run, built with the tests in one pass: one feature set
# (dev-dependencies included), so nextest finds everything built instead of compiling the
# workspace a second time.
cargo build --locked --workspace --bins --tests
# Every fuzz target briefly, from its committed corpus (builds them; known crash inputs).
bash scripts/fuzz.sh
cargo nextest run --locked --workspace --no-fail-fast "$@"
