#!/usr/bin/env bash
# Sets up, builds, and runs the demo: a simulated two-node cluster from examples/, one
# mesh-node and one tunnel per node, Prometheus on localhost:9090. It stays up until
# `sudo ./scripts/demo.sh down` (or Ctrl-C). Extra arguments go to weft-demo (--exit tears
# down right after showing what happened).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "down" ]; then
  if [ ! -s /run/weft-demo.pid ]; then
    echo "demo: no demo is running (no /run/weft-demo.pid)"
    exit 0
  fi
  pid=$(cat /run/weft-demo.pid)
  kill -TERM "$pid" 2>/dev/null || { echo "demo: process $pid is gone"; rm -f /run/weft-demo.pid; exit 0; }
  while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
  echo "demo: torn down"
  exit 0
fi
bash scripts/setup.sh --demo
cargo build --locked --workspace --bins
exec target/debug/weft-demo "$@"
