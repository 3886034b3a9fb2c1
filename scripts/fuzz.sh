#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for a few seconds from its committed corpus
# (fuzz/corpus/<target>, which also holds any input that once crashed it), so the targets keep
# building and known crash inputs stay fixed. `FUZZ_SECONDS=600 scripts/fuzz.sh` for a longer
# local run; `scripts/fuzz.sh <target>` for one. New inputs go to a scratch folder, not the repo.
set -euo pipefail
cd "$(dirname "$0")/.."
# The pinned nightly of the eBPF build (scripts/setup.sh installs it): libFuzzer needs a nightly.
NIGHTLY=nightly-2026-05-20
seconds="${FUZZ_SECONDS:-5}"
# A brief run (the test command's) builds unoptimised: it compiles in half the time, and the
# seconds are there to prove the targets build and the corpus passes. Longer runs optimise.
profile=--dev
if [ "$seconds" -gt 30 ]; then profile=--release; fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --locked cargo-fuzz@0.13.2
fi
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  mapfile -t targets < <(cargo +"$NIGHTLY" fuzz list)
fi
# Safe Rust: the targets look for panics, hangs and runaway memory, so no sanitizer (and a
# build that fits in CI's time).
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "fuzz: building the targets"
if ! cargo +"$NIGHTLY" fuzz build "$profile" -s none >"$scratch/build.log" 2>&1; then
  tail -n 60 "$scratch/build.log" >&2
  exit 1
fi
for target in "${targets[@]}"; do
  mkdir -p "$scratch/$target"
  echo "fuzz: $target for ${seconds}s"
  log="$scratch/$target.log"
  if ! cargo +"$NIGHTLY" fuzz run "$profile" -s none "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=1024 -timeout=10 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz: $target failed; the input is under fuzz/artifacts/$target" >&2
    exit 1
  fi
  grep -E '^Done' "$log" || true
done
