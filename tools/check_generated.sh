#!/usr/bin/env bash
# Regenerate every committed generated file into a temporary directory and
# compare: exits 1, naming the files, when the committed ones are stale (or
# missing, or no longer generated). Fix with the commands printed below.
#
# Usage: tools/check_generated.sh        (PYTHON=... to pick the interpreter)
set -euo pipefail

cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Each job: committed output directory, include directory, extra protoc outputs.
# The .proto files are every *.proto under the include directory.
jobs=(
    "src|proto|--python_out --pyi_out --ttrpc_out"
    "tests/interop|tests/interop|--python_out --pyi_out --ttrpc_out"
    "tests/codegen|tests/codegen|--python_out --pyi_out --ttrpc_out"
    "examples|examples|--python_out --pyi_out --ttrpc_out"
)
# Names of generated files: whatever matches is expected to come from protoc.
generated='.*\(_pb2\.py\|_pb2\.pyi\|_ttrpc\.py\)$'

status=0
for job in "${jobs[@]}"; do
    IFS='|' read -r out include kinds <<<"$job"
    mapfile -t protos < <(find "$include" -name '*.proto' -not -path '*/go/*' | LC_ALL=C sort)
    dest="$tmp/$out"
    mkdir -p "$dest"
    outputs=()
    for kind in $kinds; do
        outputs+=("$kind=$dest")
    done
    regen="$python -m ttrpc.protoc -I $include ${outputs[*]//$dest/$out} ${protos[*]}"
    if ! "$python" -m ttrpc.protoc -I "$include" "${outputs[@]}" "${protos[@]}"; then
        echo "check_generated: protoc failed for $include" >&2
        exit 1
    fi

    # Only the parts of $out that protoc writes to are compared (src also holds
    # hand-written code): the directories of the regenerated files.
    mapfile -t fresh < <(cd "$dest" && find . -type f -regex "$generated" | sed 's|^\./||' \
        | LC_ALL=C sort)
    mapfile -t dirs < <(printf '%s\n' "${fresh[@]}" | xargs -n1 dirname | LC_ALL=C sort -u)
    mapfile -t committed < <(cd "$out" && find "${dirs[@]}" -maxdepth 1 -type f -regex "$generated" \
        | sed 's|^\./||' | LC_ALL=C sort)

    stale=0
    for file in "${committed[@]}"; do
        if [[ ! -e "$dest/$file" ]]; then
            echo "check_generated: $out/$file is committed but no longer generated" >&2
            stale=1
        fi
    done
    for file in "${fresh[@]}"; do
        if [[ ! -e "$out/$file" ]]; then
            echo "check_generated: $out/$file is missing" >&2
            stale=1
        elif ! diff -u "$out/$file" "$dest/$file" >&2; then
            echo "check_generated: $out/$file differs from freshly generated output" >&2
            stale=1
        fi
    done
    if [[ $stale -ne 0 ]]; then
        echo "check_generated: regenerate with: $regen" >&2
        status=1
    fi
done

if [[ $status -eq 0 ]]; then
    echo "check_generated: all generated files are up to date"
else
    echo "check_generated: FAILED: committed generated files are out of date (see above)" >&2
fi
exit $status
