#!/bin/sh
# Build the Go benchmark peers against the Go ttrpc shipped by Debian, offline,
# in GOPATH mode (the approach of tests/interop/go/build.sh):
#   OUTDIR/go-server  the interop reference server (tests/interop/go/go-server)
#   OUTDIR/go-bench   the Echo load generator (bench/go/go-bench)
#
# Usage: bench/go/build.sh OUTDIR
#
# Needs (Debian 12): golang-go golang-github-containerd-ttrpc-dev
#                    golang-github-gogo-protobuf-dev protobuf-compiler
set -eu

die() {
	echo "build.sh: $*" >&2
	exit 1
}

[ $# -eq 1 ] || die "usage: $0 OUTDIR"

here=$(cd "$(dirname "$0")" && pwd)
interop="$here/../../tests/interop"
gocode=/usr/share/gocode

command -v go >/dev/null || die "go not found (apt install golang-go)"
command -v protoc >/dev/null || die "protoc not found (apt install protobuf-compiler)"
[ -f "$interop/interop.proto" ] || die "missing $interop/interop.proto"
[ -d "$gocode/src/github.com/containerd/ttrpc" ] ||
	die "Go ttrpc sources not found (apt install golang-github-containerd-ttrpc-dev)"
[ -d "$gocode/src/github.com/gogo/protobuf" ] ||
	die "gogo protobuf sources not found (apt install golang-github-gogo-protobuf-dev)"

mkdir -p "$1"
out=$(cd "$1" && pwd)

work=$(mktemp -d "${TMPDIR:-/tmp}/ttrpc-bench-go.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 1' INT TERM HUP

export GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0
export GOPATH="$work/gopath:$gocode"
cache=${GOCACHE:-$(go env GOCACHE 2>/dev/null || true)}
if [ -z "$cache" ] || [ "$cache" = off ] || ! mkdir -p "$cache" 2>/dev/null || [ ! -w "$cache" ]; then
	cache="$work/gocache"
fi
export GOCACHE="$cache"

src="$work/gopath/src/ttrpcinterop"
mkdir -p "$src" "$work/bin"

go build -trimpath -o "$work/bin/protoc-gen-gogottrpc" github.com/containerd/ttrpc/cmd/protoc-gen-gogottrpc

cp "$interop/interop.proto" "$work/interop.proto"
PATH="$work/bin:$PATH" protoc -I"$work" --gogottrpc_out=plugins=ttrpc:"$work/gopath/src" "$work/interop.proto"
[ -f "$src/interop/interop.pb.go" ] || die "protoc did not produce interop.pb.go"

for pkg in cli go-server; do
	mkdir -p "$src/$pkg"
	cp "$interop/go/$pkg"/*.go "$src/$pkg/"
done
mkdir -p "$src/go-bench"
cp "$here/go-bench"/*.go "$src/go-bench/"

go build -trimpath -ldflags "-s -w" -o "$out/" ttrpcinterop/go-server ttrpcinterop/go-bench
[ -x "$out/go-server" ] && [ -x "$out/go-bench" ] || die "go build did not produce both binaries"

echo "built $out/go-server $out/go-bench"
