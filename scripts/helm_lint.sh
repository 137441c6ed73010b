#!/usr/bin/env bash
# Checks the Helm chart the way CI does: `helm lint --strict`, then `helm template` under every
# values file in deploy/helm/crm/ci/ (the value matrix), then every rendered manifest validated
# strictly against the Kubernetes schemas (unknown fields and unknown kinds are errors).
# Usage: scripts/helm_lint.sh HELM PYTHON
# KUBE_VERSION (default 1.35.0) renders and validates; MIN_KUBE_VERSION (default 1.30.0, the chart's
# kubeVersion floor) validates the same manifests again.
set -euo pipefail
helm=$1
python=$2
kube_version=${KUBE_VERSION:-1.35.0}
min_kube_version=${MIN_KUBE_VERSION:-1.30.0}
chart=deploy/helm/crm
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# files/policy.yaml is a symlink to the gateway's default policy; helm logs that it follows it.
quiet_symlinks() { grep -v 'found symbolic link in path' >&2 || true; }

shopt -s nullglob
matrix=("$chart"/ci/*-values.yaml)
if [ ${#matrix[@]} -eq 0 ]; then
  echo "no values files in $chart/ci" >&2
  exit 1
fi
for values in "${matrix[@]}"; do
  name=$(basename "$values" -values.yaml)
  echo "== $name"
  "$helm" lint --strict --quiet --kube-version "$kube_version" -f "$values" "$chart" 2> >(quiet_symlinks)
  "$helm" template crm "$chart" --namespace crm --kube-version "$kube_version" -f "$values" \
    >"$out/$name.yaml" 2> >(quiet_symlinks)
done
# The packaged chart (what a registry serves) must be complete on its own: files/policy.yaml is a
# symlink into the gateway's code, and the archive must carry its content.
echo "== packaged"
"$helm" package "$chart" --destination "$out/package" >/dev/null 2> >(quiet_symlinks)
"$helm" template crm "$out"/package/crm-*.tgz --namespace crm --kube-version "$kube_version" >"$out/packaged.yaml"
grep -q '^  policy.yaml: |' "$out/packaged.yaml" || { echo "the packaged chart lost the gateway policy" >&2; exit 1; }
"$python" scripts/validate_manifests.py "$kube_version" "$out"/*.yaml
"$python" scripts/validate_manifests.py "$min_kube_version" "$out"/*.yaml | tail -n 1
# Every value documented with `## @param`, and the README's tables generated from them.
"$python" scripts/helm_values_doc.py --check
