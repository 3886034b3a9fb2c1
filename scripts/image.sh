#!/usr/bin/env bash
# Builds Weft's container image (mesh-node and ztunnel) with buildah, from Debian's packages
# only: no registry is needed. The root holds the binaries and the C libraries they link
# (from Debian's libc6 and libgcc-s1 packages, fetched with apt-get and unpacked), an
# /etc/passwd with the non-root user the controller runs as, and nothing else: no shell, no
# package manager.
#
#   scripts/image.sh [--debug] [--tag weft:0.1.0]
#
# --debug packs target/debug's binaries (the tests' node rehearsal) instead of building and
# packing release ones. Prints the image's name and size. Needs root, buildah, apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
tag=weft:0.1.0
while [ $# -gt 0 ]; do
  case "$1" in
    --debug) profile=debug ;;
    --tag) tag="$2"; shift ;;
    *) echo "image: unknown argument $1 (--debug, --tag NAME)" >&2; exit 2 ;;
  esac
  shift
done

binaries=(mesh-node ztunnel)
if [ "$profile" = release ]; then
  cargo build --locked --release -p mesh-node -p ztunnel --bins
fi
for b in "${binaries[@]}"; do
  [ -x "target/$profile/$b" ] || { echo "image: target/$profile/$b is missing (cargo build first)" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{usr/bin,etc,tmp,var/run}
chmod 1777 "$root/tmp"

# The C runtime from Debian's packages (the versions this machine's apt knows).
packages=(libc6 libgcc-s1)
(cd "$work" && apt-get download -qq "${packages[@]}" >/dev/null 2>&1) || {
  apt-get update -qq && (cd "$work" && apt-get download -qq "${packages[@]}")
}
for deb in "$work"/*.deb; do
  dpkg-deb -x "$deb" "$work/unpacked"
done
# Only what the binaries load: the dynamic loader and the libraries ldd names.
needed=$(for b in "${binaries[@]}"; do ldd "target/$profile/$b"; done \
  | awk '/=>/ {print $1} /ld-linux/ {print $1}' | xargs -n1 basename | sort -u)
for lib in $needed; do
  found=$(cd "$work/unpacked" && find . -name "$lib")
  [ -n "$found" ] || { echo "image: $lib is in none of ${packages[*]}" >&2; exit 1; }
  # Every path the package gives it (the loader is also /lib64/ld-linux-x86-64.so.2, a link).
  for path in $found; do
    mkdir -p "$root/$(dirname "$path")"
    cp -a "$work/unpacked/$path" "$root/$path"
  done
done
mkdir -p "$root/usr/share/doc/weft"
for p in "${packages[@]}"; do
  cp "$work/unpacked/usr/share/doc/$p/copyright" "$root/usr/share/doc/weft/$p.copyright" 2>/dev/null || true
done

for b in "${binaries[@]}"; do
  install -m 0755 "target/$profile/$b" "$root/usr/bin/$b"
  # Release: no symbols (a panic's message and location stay); debug: symbols, for backtraces.
  if [ "$profile" = release ]; then strip --strip-all "$root/usr/bin/$b"; else strip --strip-debug "$root/usr/bin/$b"; fi
done
cat > "$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/usr/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/usr/sbin/nologin
EOF
cat > "$root/etc/group" <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"

# The binaries run in the root as they will in the image.
for b in "${binaries[@]}"; do
  chroot "$root" "/usr/bin/$b" --version >/dev/null || { echo "image: $b does not start in the image's root" >&2; exit 1; }
done

container=$(buildah from scratch)
trap 'buildah rm "$container" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
buildah copy --quiet "$container" "$root" / >/dev/null
buildah config \
  --env PATH=/usr/bin \
  --workingdir / \
  --label org.opencontainers.image.title=weft \
  --label org.opencontainers.image.description="Weft's node agent, tunnel and controller (mesh-node, ztunnel)" \
  --label org.opencontainers.image.version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  "$container"
# The image this tag named before, removed once replaced (repeated builds would pile up).
previous=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
buildah commit --quiet --rm "$container" "$tag" >/dev/null
current=$(podman image inspect --format '{{.Id}}' "$tag")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  podman rmi "$previous" >/dev/null 2>&1 || true
fi
size=$(podman image inspect "$tag" --format '{{.Size}}')
echo "image: $tag ($profile binaries), $((size / 1024 / 1024)) MiB ($size bytes)"
