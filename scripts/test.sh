#!/usr/bin/env bash
# Runs Weft's whole test suite: unit tests and the end-to-end cases on the simulated cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --locked --workspace --bins
cargo nextest run --locked --workspace --no-fail-fast "$@"
