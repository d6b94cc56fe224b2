#!/bin/sh
# Creates an empty stand-in for every target source file that Cargo.toml declares and that does
# not exist yet: src/main.rs, src/lib.rs and the file of each [[bin]], [[bench]], [[test]] and
# [[example]] (its `path`, else Cargo's default for its name). Cargo refuses to load a manifest
# whose declared targets have no file, so the Dockerfiles run this before compiling the
# dependencies alone (no sources copied yet), and again after copying src/ (benches, tests and
# examples are not part of the image and stay stubs). Prints the files it created.
#
# Usage: cargo-stubs.sh [Cargo.toml]
set -eu

manifest="${1:-Cargo.toml}"
dir="$(dirname "$manifest")"

stub() { # $1 = path relative to the manifest, $2 = contents
    [ -e "$dir/$1" ] && return 0
    mkdir -p "$(dirname "$dir/$1")"
    printf '%s\n' "$2" >"$dir/$1"
    echo "$1"
}

stub src/main.rs 'fn main() {}'
stub src/lib.rs ''

package="$(awk '/^\[/ { in_pkg = ($0 ~ /^\[package\]/) } in_pkg && /^name[ \t]*=/ {
    sub(/^name[ \t]*=[ \t]*"/, ""); sub(/".*/, ""); print; exit }' "$manifest")"

# One "kind name path" line per [[bin]]/[[bench]]/[[test]]/[[example]] table (path may be empty).
awk '
    function flush() { if (kind != "") print kind, (name == "" ? "-" : name), path; kind = "" }
    /^\[\[(bin|bench|test|example)\]\][ \t]*$/ {
        flush(); kind = $0; gsub(/[][ \t]/, "", kind); name = ""; path = ""; next
    }
    /^\[/ { flush(); next }
    kind != "" && /^name[ \t]*=/ { v = $0; sub(/^name[ \t]*=[ \t]*"/, "", v); sub(/".*/, "", v); name = v }
    kind != "" && /^path[ \t]*=/ { v = $0; sub(/^path[ \t]*=[ \t]*"/, "", v); sub(/".*/, "", v); path = v }
    END { flush() }
' "$manifest" | while read -r kind name path; do
    if [ -z "$path" ]; then
        case "$kind" in
            bin) if [ "$name" = "$package" ]; then path=src/main.rs; else path="src/bin/$name.rs"; fi ;;
            bench) path="benches/$name.rs" ;;
            test) path="tests/$name.rs" ;;
            example) path="examples/$name.rs" ;;
        esac
    fi
    stub "$path" 'fn main() {}'
done
