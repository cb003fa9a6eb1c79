#!/bin/sh
# Build the Go interop peers (go-server, go-client) against the Go ttrpc
# shipped by Debian, fully offline, in GOPATH mode.
#
# Usage: tests/interop/go/build.sh OUTDIR
#
# Needs (Debian 12): golang-go golang-github-containerd-ttrpc-dev
#                    golang-github-gogo-protobuf-dev protobuf-compiler
set -eu

die() {
	echo "build.sh: $*" >&2
	exit 1
}

[ $# -ge 1 ] || die "usage: $0 OUTDIR [EXTRA_MAIN_PACKAGE_DIR...]"

here=$(cd "$(dirname "$0")" && pwd)
proto="$here/../interop.proto"
gocode=/usr/share/gocode

command -v go >/dev/null || die "go not found (apt install golang-go)"
command -v protoc >/dev/null || die "protoc not found (apt install protobuf-compiler)"
[ -f "$proto" ] || die "missing $proto"
[ -d "$gocode/src/github.com/containerd/ttrpc" ] ||
	die "Go ttrpc sources not found (apt install golang-github-containerd-ttrpc-dev)"
[ -d "$gocode/src/github.com/gogo/protobuf" ] ||
	die "gogo protobuf sources not found (apt install golang-github-gogo-protobuf-dev)"

mkdir -p "$1"
out=$(cd "$1" && pwd)
shift

work=$(mktemp -d "${TMPDIR:-/tmp}/ttrpc-interop-go.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 1' INT TERM HUP

# GOPATH mode, no network, static binaries.
export GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0
export GOPATH="$work/gopath:$gocode"
# Reuse the user's build cache when there is a usable one (fast rebuilds);
# otherwise (no HOME, read-only HOME, ...) use a throwaway one.
cache=${GOCACHE:-$(go env GOCACHE 2>/dev/null || true)}
if [ -z "$cache" ] || [ "$cache" = off ] || ! mkdir -p "$cache" 2>/dev/null || [ ! -w "$cache" ]; then
	cache="$work/gocache"
fi
export GOCACHE="$cache"

src="$work/gopath/src/ttrpcinterop"
mkdir -p "$src" "$work/bin"

# 1. The ttrpc protoc plugin, from the packaged sources.
go build -trimpath -o "$work/bin/protoc-gen-gogottrpc" github.com/containerd/ttrpc/cmd/protoc-gen-gogottrpc

# 2. Generate ttrpcinterop/interop from interop.proto (its go_package says
#    "ttrpcinterop/interop", so the output lands in $src/interop).
cp "$proto" "$work/interop.proto"
PATH="$work/bin:$PATH" protoc -I"$work" --gogottrpc_out=plugins=ttrpc:"$work/gopath/src" "$work/interop.proto"
[ -f "$src/interop/interop.pb.go" ] || die "protoc did not produce interop.pb.go"

# 3. Our own sources, and any extra main packages the caller names (bench/go
#    adds its load generator), each built as a binary named after its directory.
for pkg in cli go-server go-client; do
	mkdir -p "$src/$pkg"
	cp "$here/$pkg"/*.go "$src/$pkg/"
done
bins="go-server go-client"
for extra in "$@"; do
	name=$(basename "$extra")
	mkdir -p "$src/$name"
	cp "$extra"/*.go "$src/$name/" || die "no Go sources in $extra"
	bins="$bins $name"
done

# 4. The binaries, in one go (a directory -o names them after their packages).
targets=""
for bin in $bins; do
	targets="$targets ttrpcinterop/$bin"
done
# shellcheck disable=SC2086 # one word per package
go build -trimpath -ldflags "-s -w" -o "$out/" $targets
for bin in $bins; do
	[ -x "$out/$bin" ] || die "go build did not produce $bin"
done

echo "built$(for bin in $bins; do printf ' %s' "$out/$bin"; done)"
