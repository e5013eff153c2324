#!/bin/sh
# Kubernetes example, `create`: credential secret, volume claim, relay pod; returns once the pod
# is Ready (the orchestrator then waits for the relay's hello).
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"

say "creating workspace $WS_ID as pod $NAME in namespace $NAMESPACE"
apply_secret
ensure_pvc
ensure_pod
