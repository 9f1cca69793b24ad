#!/usr/bin/env bash
# The [A] contract against the chat on a real cluster (what `make verify-k8s` runs):
# white-box checks inside every ready web pod through testinfra's kubectl://
# backend (`kubectl exec`), black-box checks over HTTPS through the Gateway (or the Ingress).
#
#   tests/k8s/verify_cluster.sh https://chat.example.com
#
# Environment: CHAT_NAMESPACE (default chat), KUBECTL (a kubectl binary; default
# the one on PATH), KUBECONFIG/KUBE_CONTEXT as usual, PYTHON (default .venv/bin/python),
# CHAT_VERIFY_USERS="alice:pw1,bob:pw2" to use existing accounts instead of signing up.
set -euo pipefail

url=${1:?usage: $0 https://YOUR-PUBLIC-HOST}
ns=${CHAT_NAMESPACE:-chat}
repo=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
if [ -n "${KUBECTL:-}" ]; then
  # testinfra's kubectl backend runs the `kubectl` found on PATH.
  PATH="$(cd "$(dirname "$KUBECTL")" && pwd):$PATH"
fi
command -v kubectl >/dev/null || { echo "verify_cluster.sh: kubectl not found (set KUBECTL)" >&2; exit 1; }
kubectl_args=(-n "$ns")
query=""
if [ -n "${KUBE_CONTEXT:-}" ]; then kubectl_args+=(--context "$KUBE_CONTEXT"); query+="&context=$KUBE_CONTEXT"; fi
if [ -n "${KUBECONFIG:-}" ]; then query+="&kubeconfig=$KUBECONFIG"; fi

kubectl "${kubectl_args[@]}" rollout status deployment/chat-redis --timeout=5m
kubectl "${kubectl_args[@]}" rollout status deployment/chat-web --timeout=10m

# Ready web pods only (what the Service routes to).
pods=$(kubectl "${kubectl_args[@]}" get pods -l app.kubernetes.io/name=chat,app.kubernetes.io/component=web \
  -o jsonpath='{range .items[?(@.status.phase=="Running")]}{.metadata.name}{" "}{range .status.conditions[?(@.type=="Ready")]}{.status}{end}{"\n"}{end}' \
  | awk '$2 == "True" {print $1}')
[ -n "$pods" ] || { echo "verify_cluster.sh: no ready web pod in namespace $ns" >&2; exit 1; }
hosts=""
for pod in $pods; do
  hosts+="${hosts:+,}kubectl://$pod?container=web&namespace=$ns$query"
done
first=$(echo "$pods" | head -n 1)
workers=$(kubectl "${kubectl_args[@]}" exec "$first" -c web -- sh -c 'echo "${WEB_CONCURRENCY:-2}"')
port=$(kubectl "${kubectl_args[@]}" exec "$first" -c web -- sh -c 'echo "${PORT:-8000}"')
echo "contract: $url, pods: $(echo $pods), workers $workers, port $port"

cd "$repo"
export CHAT_CONTRACT_URL="$url" CHAT_CONTRACT_HOSTS="$hosts" CHAT_CONTRACT_WORKERS="$workers" CHAT_CONTRACT_PORT="$port"
exec "$python" - <<'PY'
import os
from tests.harness.contract import run_contract

out = run_contract(
    os.environ["CHAT_CONTRACT_URL"], os.environ["CHAT_CONTRACT_HOSTS"],
    workers=int(os.environ["CHAT_CONTRACT_WORKERS"]), port=int(os.environ["CHAT_CONTRACT_PORT"]),
    redis="chat-redis:6379",   # as seen from inside a web pod (the Service name)
    https_proxy=False,         # real TLS at the Gateway or Ingress
)
print(out.strip().splitlines()[-1])
PY
