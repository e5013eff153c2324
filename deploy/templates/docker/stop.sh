#!/bin/sh
# Docker example, `stop`: stops the container; it and its volume stay for `start`.
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"

check_daemon
state=$(container_state)
case "$state" in
  "")
    say "there is no container $NAME: nothing to stop"
    ;;
  running | restarting | paused)
    say "stopping workspace $WS_ID: container $NAME ($state); volume $NAME keeps the files"
    run docker stop --time "$STOP_TIMEOUT" "$NAME"
    say "stopped"
    ;;
  *)
    say "container $NAME is already $state: nothing to stop"
    ;;
esac
