#!/bin/sh
# Kubernetes example, `start`: a new relay pod on the workspace's existing volume claim.
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"

say "starting workspace $WS_ID: pod $NAME in namespace $NAMESPACE on its volume claim"
ensure_pvc
apply_secret
ensure_pod
