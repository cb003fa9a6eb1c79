#!/bin/sh
# Build the Go benchmark peers against the Go ttrpc shipped by Debian, offline:
#   OUTDIR/go-server  the interop reference server (tests/interop/go/go-server)
#   OUTDIR/go-bench   the Echo load generator (bench/go/go-bench)
# (and go-client): tests/interop/go/build.sh does the work, with go-bench added.
#
# Usage: bench/go/build.sh OUTDIR
set -eu
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/../../tests/interop/go/build.sh" "$1" "$here/go-bench"
