#!/bin/sh
# Docker example, `delete`: removes the container and its volume (the workspace files). Whatever
# is already gone is skipped, so deleting twice succeeds.
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"

check_daemon
say "deleting workspace $WS_ID: container and volume $NAME"
if [ -n "$(container_state)" ]; then
  run docker rm --force "$NAME"
else
  say "no container $NAME"
fi
if volume_exists; then
  run docker volume rm "$NAME"
else
  say "no volume $NAME"
fi
say "deleted"
