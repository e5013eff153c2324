#!/bin/sh
# Kubernetes example, `stop`: the pod goes (Kubernetes' scale to zero for a lone pod); the volume
# claim with the workspace files and the credential secret stay for `start`.
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"

say "stopping workspace $WS_ID: deleting pod $NAME; volume claim $NAME keeps the files"
kr delete pod "$NAME" --ignore-not-found --wait=true --timeout=120s
say "stopped"
