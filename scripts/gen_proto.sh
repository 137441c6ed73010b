#!/usr/bin/env bash
# Generates Python messages, gRPC stubs and type stubs for every file under proto/.
set -euo pipefail
python="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
out=$(realpath -m "$2")
export PATH="$(dirname "$python"):$PATH"
# Generate beside the live tree, then swap, so concurrent importers never see a half-written tree.
staging="$out/.staging-$$"
rm -rf "$staging"
mkdir -p "$staging"
trap 'rm -rf "$staging"' EXIT
include=$("$python" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
mapfile -t files < <(cd proto && find crm -name '*.proto' | sort)
# The mypy plugins chat on stderr; show it only when generation fails.
log="$staging.log"
if ! (cd proto && "$python" -m grpc_tools.protoc -I. -I"$include" \
  --python_out="$staging" --mypy_out="$staging" \
  --grpc_python_out="$staging" --mypy_grpc_out="$staging" \
  "${files[@]}") >"$log" 2>&1; then
  cat "$log" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
# Regular packages (not namespace packages) so mypy and importers see one tree.
find "$staging/crm" -type d -exec touch {}/__init__.py \;
touch "$staging/crm/py.typed"
rm -rf "$out/crm.old"
[ -d "$out/crm" ] && mv "$out/crm" "$out/crm.old"
mv "$staging/crm" "$out/crm"
rm -rf "$out/crm.old"
