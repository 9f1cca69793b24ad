#!/usr/bin/env bash
# One release, in the order that keeps the site up:
#   1. delete the previous (finished) migration Job: its pod template is
#      immutable, so applying a new image/config onto it would fail;
#   2. kubectl apply -k: creates the new Job and updates everything else at once;
#      new web pods wait in their init container until the Job has migrated,
#      while the old pods keep serving (maxUnavailable: 0);
#   3. wait for the Job, then for the rollout.
# Usage: deploy/k8s/release.sh [KUSTOMIZE_DIR]   (default: this directory)
# Needs: kubectl >= 1.30 pointing at the cluster; the Secret chat-secrets exists.
set -euo pipefail
dir=${1:-$(dirname "$0")}
ns=${CHAT_NAMESPACE:-chat}
kubectl=${KUBECTL:-kubectl}

if ! $kubectl -n "$ns" get secret chat-secrets >/dev/null 2>&1; then
  echo "release.sh: create the Secret chat-secrets in namespace $ns first (deploy/k8s/README.md)" >&2
  exit 1
fi
$kubectl -n "$ns" delete job chat-migrate --ignore-not-found --wait=true
$kubectl apply -k "$dir"
if ! $kubectl -n "$ns" wait --for=condition=complete job/chat-migrate --timeout=15m; then
  $kubectl -n "$ns" logs job/chat-migrate --tail=50 >&2 || true
  echo "release.sh: migrations failed; the old pods keep serving" >&2
  exit 1
fi
# Redis: the Deployment, or the StatefulSet of components/redis-sentinel.
if $kubectl -n "$ns" get statefulset/chat-redis >/dev/null 2>&1; then
  $kubectl -n "$ns" rollout status statefulset/chat-redis --timeout=5m
else
  $kubectl -n "$ns" rollout status deployment/chat-redis --timeout=5m
fi
$kubectl -n "$ns" rollout status deployment/chat-web --timeout=15m
