#!/bin/sh
# Docker example, `start`: starts the stopped container again (recreating it on the same volume
# if it was removed).
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"

say "starting workspace $WS_ID: container $NAME"
ensure_running
