#!/usr/bin/env bash
# Checks proto/ for breaking changes (WIRE_JSON) against the previous commit of this branch.
set -euo pipefail
buf=$1
if ! git rev-parse --verify --quiet HEAD~1 >/dev/null; then
  echo "buf breaking: no previous commit to compare against"
  exit 0
fi
if ! git cat-file -e HEAD~1:proto/buf.yaml 2>/dev/null; then
  echo "buf breaking: proto/ did not exist in the previous commit"
  exit 0
fi
"$buf" breaking proto --against ".git#ref=HEAD~1,subdir=proto"
echo "buf breaking: no breaking change against HEAD~1"
