#!/bin/sh
# Kubernetes example, `delete`: pod, volume claim (the workspace files) and secret. Whatever is
# already gone is skipped, so deleting twice succeeds.
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"

say "deleting workspace $WS_ID: pod, volume claim and secret $NAME in namespace $NAMESPACE"
kr delete pod "$NAME" --ignore-not-found --wait=true --timeout=120s
kr delete pvc "$NAME" --ignore-not-found --wait=true --timeout=120s
kr delete secret "$NAME" --ignore-not-found
say "deleted"
