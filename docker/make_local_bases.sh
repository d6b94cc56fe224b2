#!/usr/bin/env bash
# Builds local stand-ins for the Dockerfile's public base images, for a machine that runs a
# Docker daemon but cannot pull from Docker Hub:
#
#   knots-local/debian:bookworm-slim      debootstrap (minbase) of Debian bookworm
#   knots-local/rust:bookworm             the same plus gcc/libc6-dev/ca-certificates and this
#                                         machine's Rust toolchain (the one `rustc` runs here)
#
# Then build with them (what `make docker-check` does):
#   docker build --build-arg RUST_IMAGE=knots-local/rust:bookworm \
#     --build-arg RUNTIME_IMAGE=knots-local/debian:bookworm-slim -f docker/Dockerfile -t knots .
#
# Needs root, debootstrap and a reachable Debian mirror. The mirror is read from this machine's
# apt sources (the first one serving the suite); DEBIAN_MIRROR overrides it. An image that
# already exists is kept unless --force is given.
#
# Usage: docker/make_local_bases.sh [--force]
# Environment: DEBIAN_SUITE (bookworm), DEBIAN_MIRROR, LOCAL_RUST_IMAGE, LOCAL_RUNTIME_IMAGE,
#              RUST_TOOLCHAIN_DIR (default: the sysroot of `rustc` on PATH).
set -euo pipefail

SUITE="${DEBIAN_SUITE:-bookworm}"
RUST_TAG="${LOCAL_RUST_IMAGE:-knots-local/rust:$SUITE}"
RUNTIME_TAG="${LOCAL_RUNTIME_IMAGE:-knots-local/debian:$SUITE-slim}"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

die() { echo "make_local_bases: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
docker info >/dev/null 2>&1 || die "no Docker daemon answers (start dockerd first)"

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# The first http(s) mirror in the apt sources (one-line and deb822 formats) that serves $SUITE.
apt_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # deb822: stanzas separated by blank lines; take URIs of a stanza whose Suites has $SUITE.
        awk -v suite="$SUITE" '
            function flush() {
                if (uris != "" && types ~ /(^| )deb( |$)/) {
                    n = split(suites, s, " ")
                    for (k = 1; k <= n; k++) if (s[k] == suite) { split(uris, u, " "); print u[1]; exit }
                }
                uris = ""; suites = ""; types = ""
            }
            /^[ \t]*$/ { flush(); next }
            /^URIs:/ { sub(/^URIs:[ \t]*/, ""); uris = $0 }
            /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
            /^Types:/ { sub(/^Types:[ \t]*/, ""); types = $0 }
            END { flush() }' "$f"
    done
}

MIRROR="${DEBIAN_MIRROR:-$(apt_mirror | grep -E '^https?://' | head -n 1)}"
[ -n "$MIRROR" ] || die "no apt source serves '$SUITE'; set DEBIAN_MIRROR"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
KEYRING_ARGS=()
[ -f "$KEYRING" ] && KEYRING_ARGS=(--keyring "$KEYRING")

WORK="$(mktemp -d "${TMPDIR:-/var/tmp}/knots-bases.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# debootstrap $1=rootfs, rest: extra packages (comma-separated list as one argument, optional).
bootstrap() {
    local root="$1" include="${2:-}"
    local args=(--variant=minbase "${KEYRING_ARGS[@]}")
    [ -n "$include" ] && args+=(--include="$include")
    echo "debootstrap $SUITE into $root${include:+ (+ $include)}"
    debootstrap "${args[@]}" "$SUITE" "$root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
    # Like Debian's own images: no package lists or caches in the image.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
}

import() {
    local root="$1" tag="$2"
    shift 2
    tar --numeric-owner -C "$root" -c . | docker import "$@" - "$tag" >/dev/null
    echo "built $tag"
}

if [ "$FORCE" = 1 ] || ! have_image "$RUNTIME_TAG"; then
    bootstrap "$WORK/runtime"
    import "$WORK/runtime" "$RUNTIME_TAG" --change 'CMD ["bash"]'
    rm -rf "$WORK/runtime"
else
    echo "$RUNTIME_TAG exists (--force rebuilds it)"
fi

if [ "$FORCE" = 1 ] || ! have_image "$RUST_TAG"; then
    TOOLCHAIN="${RUST_TOOLCHAIN_DIR:-$(rustc --print sysroot 2>/dev/null || true)}"
    [ -x "$TOOLCHAIN/bin/cargo" ] && [ -x "$TOOLCHAIN/bin/rustc" ] \
        || die "no Rust toolchain with cargo and rustc at '$TOOLCHAIN' (set RUST_TOOLCHAIN_DIR)"
    VERSION="$("$TOOLCHAIN/bin/rustc" --version | awk '{print $2}')"
    echo "Rust toolchain $VERSION from $TOOLCHAIN"
    NEEDED="$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' "$(dirname "$0")/../Cargo.toml")"
    if [ -n "$NEEDED" ] && [ "$(printf '%s\n%s\n' "$NEEDED" "$VERSION" | sort -V | head -n 1)" != "$NEEDED" ]; then
        die "Rust $VERSION is older than the crate's rust-version $NEEDED"
    fi
    # The same packages as the official rust:*-slim images.
    bootstrap "$WORK/rust" ca-certificates,gcc,libc6-dev
    # The official image's layout: toolchains under RUSTUP_HOME, tools on PATH in CARGO_HOME/bin.
    dest="$WORK/rust/usr/local/rustup/toolchains/$VERSION-x86_64-unknown-linux-gnu"
    mkdir -p "$dest" "$WORK/rust/usr/local/cargo/bin"
    for d in bin lib libexec etc; do
        [ -d "$TOOLCHAIN/$d" ] && cp -a "$TOOLCHAIN/$d" "$dest/"
    done
    printf 'version = "12"\ndefault_toolchain = "%s-x86_64-unknown-linux-gnu"\nprofile = "minimal"\n' \
        "$VERSION" >"$WORK/rust/usr/local/rustup/settings.toml"
    for tool in "$dest"/bin/*; do
        ln -s "../../rustup/toolchains/$VERSION-x86_64-unknown-linux-gnu/bin/$(basename "$tool")" \
            "$WORK/rust/usr/local/cargo/bin/$(basename "$tool")"
    done
    import "$WORK/rust" "$RUST_TAG" \
        --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
        --change 'ENV CARGO_HOME=/usr/local/cargo' \
        --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]'
    docker run --rm "$RUST_TAG" cargo --version
else
    echo "$RUST_TAG exists (--force rebuilds it)"
fi
