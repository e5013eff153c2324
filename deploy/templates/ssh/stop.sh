#!/bin/sh
# SSH example, `stop`: stops the relay; the workspace directory stays for `start`.
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"

say "stopping workspace $WS_ID on $TARGET: the relay stops, $DIR stays"
remote_script "$STOP_TIMEOUT" <<'EOF_REMOTE'
if [ ! -d "$dir" ]; then
  echo "there is no $dir on this host: nothing to stop"
  exit 0
fi
stop_relay "$2"
EOF_REMOTE
