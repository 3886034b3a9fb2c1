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
demo=0
[ "${1:-}" = "--demo" ] && demo=1
declare -A packages=(
  [ip]=iproute2
  [curl]=curl
  [tcpdump]=tcpdump
  [stunnel4]=stunnel4
  [iperf3]=iperf3
  [sysctl]=procps
  [ss]=iproute2
  [nft]=nftables
  [bpftool]=bpftool
  # The install's node pod is rehearsed under podman, from an image buildah builds.
  [podman]=podman
  [buildah]=buildah
  [runc]=runc
)
# The demo runs a real Prometheus; the tests do not need it.
if [ "$demo" = 1 ]; then packages[prometheus]=prometheus; fi
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
# The eBPF toolchain (pins from ../shared/design/TOOLCHAIN.md): the programs are built with a
# nightly that shares its LLVM major (22) with bpf-linker.
EBPF_NIGHTLY=nightly-2026-05-20
if [ ! -e /usr/lib/llvm-22/lib/libLLVM-22.so ]; then
  echo "setup: installing llvm-22-dev"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends llvm-22-dev >/dev/null
fi
if ! rustup run "$EBPF_NIGHTLY" rustc --version >/dev/null 2>&1 \
   || [ ! -d "$(rustup run "$EBPF_NIGHTLY" rustc --print sysroot)/lib/rustlib/src/rust/library" ]; then
  echo "setup: installing the $EBPF_NIGHTLY toolchain with rust-src"
  rustup toolchain install "$EBPF_NIGHTLY" --profile minimal --component rust-src
fi
if ! bpf-linker --version 2>/dev/null | grep -q '0.13.0'; then
  echo "setup: installing bpf-linker 0.13.0 (llvm-22)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker@0.13.0 --no-default-features --features llvm-22
fi

# /run/netns must exist for `ip netns`; it is created on first use, but make sure.
mkdir -p /run/netns
# Capture pins its programs and maps on the BPF file system; container and CI machines often
# start without it mounted.
if ! grep -qs ' - bpf ' /proc/self/mountinfo; then
  echo "setup: mounting the BPF file system on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

# podman 4.3 on these machines: the runc runtime (crun refuses the hybrid cgroup layout), and no
# default ulimits (its defaults are above what the machine allows).
if ! grep -qs '^default_ulimits' /etc/containers/containers.conf; then
  mkdir -p /etc/containers
  printf '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n' >> /etc/containers/containers.conf
fi
# The install is rendered with `kubectl kustomize` (kustomize 4 or later, for components).
if ! command -v kubectl >/dev/null 2>&1; then
  echo "setup: installing kubernetes-client for kubectl"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
fi
if ! kubectl version --client 2>/dev/null | grep -q 'Kustomize Version: v[4-9]'; then
  echo "setup: warning: $(command -v kubectl) has no kustomize 4 or later; install/'s tests need it (kubectl 1.21+)" >&2
fi
