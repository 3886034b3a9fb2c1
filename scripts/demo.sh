#!/usr/bin/env bash
# Sets up, builds, and runs the two-node tunnel demo on the simulated cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --locked --workspace --bins
exec target/debug/weft-demo "$@"
