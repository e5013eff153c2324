#!/bin/sh
# Kubernetes example, shared part of create.sh, start.sh, stop.sh and delete.sh.
# ../render.sh inlines this file into every script of template.json, so each script runs alone
# under `sh -c` with only the environment the orchestrator gives it (see ../README.md).
#
# Per workspace, in the namespace chosen by the `namespace` parameter, all named
# agentplane-<workspace id> and labelled agentplane/workspace=<workspace id>:
#   Secret                 the relay's NATS credential (only when NATS has auth)
#   PersistentVolumeClaim  the workspace files (/agentplane/workspace) and relay journal
#                          (/agentplane/state); survives stop/start
#   Pod                    one container running agentplane-relay; deleted on stop
set -eu
exec 2>&1 # one stream: the provisioning log keeps the order in which things happened

# ---- Operator settings: edit here, then run ../render.sh ----------------------------------
# kubectl gets no KUBECONFIG from the orchestrator (scripts see only PATH, HOME, LANG and
# AGENTPLANE_*), so it reads $HOME/.kube/config. Point elsewhere here. When the orchestrator
# itself runs in a pod and there is no kubeconfig, its service account is used.
KUBECONFIG_FILE=""
KUBE_CONTEXT=""
# Storage class of the workspace volume claims; empty = the cluster's default class.
STORAGE_CLASS=""
# How long a new pod may take to become Ready (image pull included).
READY_TIMEOUT="300s"
# Name of an image pull secret in the namespace, for a private registry; empty = none.
IMAGE_PULL_SECRET=""
# ---------------------------------------------------------------------------------------------

say() { printf '%s\n' "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}
need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed on the orchestrator host (or not on its PATH: $PATH)"
}

need kubectl
need jq
need awk

ACTION=${AGENTPLANE_ACTION:-manual}
WS_ID=${AGENTPLANE_WORKSPACE_ID:?is not set: run this script through agentplane, or export it to test by hand}
NATS_URL=${AGENTPLANE_NATS_URL:?is not set: run this script through agentplane, or export it to test by hand}
NATS_PREFIX=${AGENTPLANE_NATS_PREFIX:-ap}
CREDS_FILE=${AGENTPLANE_RELAY_CREDS_FILE:-}

# Parameters (the orchestrator fills in the template's defaults; the fallbacks here only serve
# runs by hand and must match template.base.json).
NAMESPACE=${AGENTPLANE_PARAM_NAMESPACE:-agentplane-workspaces}
IMAGE=${AGENTPLANE_PARAM_IMAGE:-agentplane-workspace:latest}
CPU=${AGENTPLANE_PARAM_CPU:-1}
MEMORY_GIB=${AGENTPLANE_PARAM_MEMORY_GIB:-2}
DISK_GIB=${AGENTPLANE_PARAM_DISK_GIB:-10}

case "$WS_ID" in
  *[!A-Za-z0-9_-]*) die "unexpected workspace id '$WS_ID' (letters, digits, '-' and '_' only)" ;;
esac

# A DNS label (lowercase letters, digits, '-'; at most 63 characters) derived from the
# workspace id. agentplane's ids (UUIDs) pass unchanged; anything else gets a checksum suffix
# so that two ids never share a name.
ws_slug() {
  s=$(printf '%s' "$1" | tr 'ABCDEFGHIJKLMNOPQRSTUVWXYZ_' 'abcdefghijklmnopqrstuvwxyz-' | tr -cd 'a-z0-9-')
  s=$(printf '%s' "$s" | sed 's/^-*//; s/-*$//')
  if [ "$s" != "$1" ] || [ "${#s}" -gt 40 ]; then
    sum=$(printf '%s' "$1" | cksum | cut -d ' ' -f 1)
    s="$(printf '%s' "$s" | cut -c 1-30 | sed 's/-*$//')-$sum"
    s=${s#-}
  fi
  printf '%s' "$s"
}
SLUG=$(ws_slug "$WS_ID")
NAME="agentplane-$SLUG" # at most 11 + 41 characters

# Kubernetes quantities from the numeric parameters, rounded up: quantity VALUE FACTOR UNIT.
quantity() {
  awk -v v="$1" -v f="$2" -v u="$3" 'BEGIN {
    if (v !~ /^[0-9]+([.][0-9]+)?$/ || v + 0 <= 0) exit 1
    n = int(v * f); if (n < v * f) n++
    printf "%d%s", n, u
  }' || die "'$1' is not a positive number"
}
printf '%s' "$NAMESPACE" | grep -Eq '^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$' ||
  die "namespace '$NAMESPACE' is not a valid Kubernetes namespace name"
printf '%s' "$IMAGE" | grep -Eq '^[A-Za-z0-9][A-Za-z0-9._/:@-]*$' ||
  die "image '$IMAGE' is not a valid image reference"
CPU_Q=$(quantity "$CPU" 1000 m)
MEMORY_Q=$(quantity "$MEMORY_GIB" 1024 Mi)
DISK_Q=$(quantity "$DISK_GIB" 1 Gi)

if [ -n "$KUBECONFIG_FILE" ]; then
  KUBECONFIG=$KUBECONFIG_FILE
  export KUBECONFIG
elif [ ! -f "${HOME:-/nonexistent}/.kube/config" ] && [ -r /var/run/secrets/kubernetes.io/serviceaccount/token ]; then
  # In a pod, without the KUBERNETES_SERVICE_* variables the orchestrator does not pass on:
  # a kubeconfig that reads the service account's token from its file (never copied anywhere).
  KUBECONFIG=$(mktemp)
  export KUBECONFIG
  trap 'rm -f "$KUBECONFIG"' EXIT
  sa=/var/run/secrets/kubernetes.io/serviceaccount
  cat >"$KUBECONFIG" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: in-cluster
  cluster: {server: "https://kubernetes.default.svc", certificate-authority: "$sa/ca.crt"}
users:
- name: service-account
  user: {tokenFile: "$sa/token"}
contexts:
- name: in-cluster
  context: {cluster: in-cluster, user: service-account}
current-context: in-cluster
EOF
fi

# kubectl in the workspace's namespace (and the configured context).
k() {
  if [ -n "$KUBE_CONTEXT" ]; then
    kubectl --context "$KUBE_CONTEXT" --namespace "$NAMESPACE" "$@"
  else
    kubectl --namespace "$NAMESPACE" "$@"
  fi
}
# The same, saying what it does first (the provisioning log shows every change).
kr() {
  say "+ kubectl -n $NAMESPACE $*"
  k "$@"
}

LABELS=$(jq -cn --arg slug "$SLUG" '{
  "app.kubernetes.io/name": "agentplane-workspace",
  "app.kubernetes.io/managed-by": "agentplane",
  "agentplane/workspace": $slug
}')
ANNOTATIONS=$(jq -cn --arg id "$WS_ID" --arg name "${AGENTPLANE_WORKSPACE_NAME:-}" \
  --arg template "${AGENTPLANE_TEMPLATE_NAME:-}" '{
  "agentplane/workspace-id": $id,
  "agentplane/workspace-name": $name,
  "agentplane/template": $template
}')

# Server-side apply: idempotent, and no last-applied annotation copying a secret's data.
apply_manifest() {
  printf '%s\n' "$1" | kr apply --server-side --force-conflicts --field-manager=agentplane -f -
}

# The relay's credential as a Secret; refreshed on every create/start (the orchestrator mints
# one per run). Its contents are never printed.
apply_secret() {
  if [ -z "$CREDS_FILE" ]; then
    say "NATS has no auth here (no AGENTPLANE_RELAY_CREDS_FILE): no credential secret"
    return 0
  fi
  [ -r "$CREDS_FILE" ] || die "cannot read the relay credential file $CREDS_FILE"
  say "storing the relay credential in secret $NAME (contents not shown)"
  manifest=$(jq -n --rawfile creds "$CREDS_FILE" --arg name "$NAME" --arg ns "$NAMESPACE" \
    --argjson labels "$LABELS" --argjson annotations "$ANNOTATIONS" '{
    apiVersion: "v1", kind: "Secret", type: "Opaque",
    metadata: {name: $name, namespace: $ns, labels: $labels, annotations: $annotations},
    data: {"relay.creds": ($creds | @base64)}
  }')
  apply_manifest "$manifest"
}

# The volume claim: created by `create`; `start` needs it to exist (the files live there).
ensure_pvc() {
  existing=$(k get pvc "$NAME" --ignore-not-found -o name)
  if [ -n "$existing" ]; then
    say "volume claim $NAME exists: the workspace files are kept"
    return 0
  fi
  if [ "$ACTION" = start ]; then
    die "volume claim $NAME in namespace $NAMESPACE is gone, and with it the workspace files; delete this workspace and create a new one"
  fi
  say "creating volume claim $NAME ($DISK_Q) for the workspace files"
  manifest=$(jq -n --arg name "$NAME" --arg ns "$NAMESPACE" --arg size "$DISK_Q" \
    --arg class "$STORAGE_CLASS" --argjson labels "$LABELS" --argjson annotations "$ANNOTATIONS" '{
    apiVersion: "v1", kind: "PersistentVolumeClaim",
    metadata: {name: $name, namespace: $ns, labels: $labels, annotations: $annotations},
    spec: ({accessModes: ["ReadWriteOnce"], resources: {requests: {storage: $size}}}
      + (if $class == "" then {} else {storageClassName: $class} end))
  }')
  apply_manifest "$manifest"
}

pod_manifest() {
  creds=false
  [ -n "$CREDS_FILE" ] && creds=true
  jq -n --arg name "$NAME" --arg ns "$NAMESPACE" --arg image "$IMAGE" --arg id "$WS_ID" \
    --arg nats "$NATS_URL" --arg prefix "$NATS_PREFIX" --arg cpu "$CPU_Q" --arg memory "$MEMORY_Q" \
    --arg pull_secret "$IMAGE_PULL_SECRET" --argjson creds "$creds" \
    --argjson labels "$LABELS" --argjson annotations "$ANNOTATIONS" '{
    apiVersion: "v1", kind: "Pod",
    metadata: {name: $name, namespace: $ns, labels: $labels, annotations: $annotations},
    spec: ({
      restartPolicy: "Always",
      # The pause container becomes PID 1 and reaps what the workspace commands leave behind.
      shareProcessNamespace: true,
      automountServiceAccountToken: false,
      enableServiceLinks: false,
      # The relay lets running tool calls finish for up to 20 s after SIGTERM.
      terminationGracePeriodSeconds: 30,
      securityContext: {seccompProfile: {type: "RuntimeDefault"}},
      containers: [{
        name: "relay",
        image: $image,
        command: ["agentplane-relay"],
        workingDir: "/agentplane",
        env: ([
          {name: "AGENTPLANE_NATS_URL", value: $nats},
          {name: "AGENTPLANE_NATS_PREFIX", value: $prefix},
          {name: "AGENTPLANE_WORKSPACE_ID", value: $id},
          {name: "AGENTPLANE_RELAY_ROOT", value: "/agentplane/workspace"},
          {name: "AGENTPLANE_RELAY_STATE_DIR", value: "/agentplane/state"},
          {name: "NO_COLOR", value: "1"}
        ] + (if $creds then [{name: "AGENTPLANE_RELAY_CREDS",
              valueFrom: {secretKeyRef: {name: $name, key: "relay.creds"}}}] else [] end)),
        resources: {requests: {cpu: $cpu, memory: $memory}, limits: {cpu: $cpu, memory: $memory}},
        volumeMounts: [{name: "workspace", mountPath: "/agentplane"}]
      }],
      volumes: [{name: "workspace", persistentVolumeClaim: {claimName: $name}}]
    } + (if $pull_secret == "" then {} else {imagePullSecrets: [{name: $pull_secret}]} end))
  }'
}

# Leaves a Ready pod running the relay, creating it if needed.
ensure_pod() {
  state=$(k get pod "$NAME" --ignore-not-found -o jsonpath='{.status.phase}/{.metadata.deletionTimestamp}')
  case "$state" in
    "") ;;
    */?*)
      say "pod $NAME is still terminating; waiting until it is gone"
      kr wait --for=delete "pod/$NAME" --timeout=120s
      state=""
      ;;
    Pending/ | Running/)
      say "pod $NAME exists (${state%/}): keeping it"
      ;;
    *)
      say "pod $NAME has ended (${state%/}): replacing it"
      kr delete pod "$NAME" --ignore-not-found --wait=true
      state=""
      ;;
  esac
  if [ -z "$state" ]; then
    say "creating pod $NAME (image $IMAGE, cpu $CPU_Q, memory $MEMORY_Q)"
    manifest=$(pod_manifest)
    printf '%s\n' "$manifest" | kr create -f -
  fi
  if ! kr wait --for=condition=Ready "pod/$NAME" --timeout="$READY_TIMEOUT"; then
    say "pod $NAME did not become Ready; what Kubernetes reports:"
    k get pod "$NAME" -o wide || true
    k describe pod "$NAME" | tail -n 25 || true
    say "relay log (last 40 lines):"
    k logs "$NAME" --tail=40 || true
    die "pod $NAME was not Ready within $READY_TIMEOUT"
  fi
  # The orchestrator waits for the relay's hello itself; this only puts the relay's own words
  # (e.g. a refused credential or an unreachable NATS URL) into the provisioning log.
  i=0
  while [ "$i" -lt 15 ]; do
    if k logs "$NAME" 2>/dev/null | grep -q 'relay serving'; then
      say "the relay is serving; the orchestrator now waits for its hello on NATS"
      return 0
    fi
    i=$((i + 1))
    sleep 1
  done
  say "warning: the relay has not reported serving yet; its log so far:"
  k logs "$NAME" --tail=20 || true
}
