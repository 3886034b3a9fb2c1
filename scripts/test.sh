#!/usr/bin/env bash
# Runs Weft's whole test suite: unit tests and the end-to-end cases on the simulated cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --locked --workspace --bins
# Every fuzz target briefly, from its committed corpus (builds them; known crash inputs).
bash scripts/fuzz.sh
cargo nextest run --locked --workspace --no-fail-fast "$@"
