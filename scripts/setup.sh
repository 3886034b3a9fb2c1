#!/usr/bin/env bash
# Installs what Weft's build, demo and tests need on a Debian bookworm machine; skips what is
# already there, so a warm machine pays nothing. Needs root (the harness needs it anyway).
set -euo pipefail

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root: the simulated cluster builds network namespaces" >&2
    exit 1
  fi
}
need_root

# command -> Debian package
declare -A packages=(
  [ip]=iproute2
  [curl]=curl
  [tcpdump]=tcpdump
  [stunnel4]=stunnel4
  [iperf3]=iperf3
  [sysctl]=procps
  [ss]=iproute2
  [nft]=nftables
)
missing=()
for cmd in "${!packages[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${packages[$cmd]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install Rust with rustup (stable >= 1.95)" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
# /run/netns must exist for `ip netns`; it is created on first use, but make sure.
mkdir -p /run/netns
