#!/bin/sh
# SSH example, `start`: the relay started again on the existing workspace directory (binary
# and credential refreshed first).
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"

say "starting workspace $WS_ID on $TARGET ($DIR)"
exists=$(remote "if [ -d $(q "$DIR/workspace") ]; then echo yes; else echo no; fi")
[ "$exists" = yes ] ||
  die "$DIR/workspace is gone from $HOST, and with it the workspace files; delete this workspace and create a new one"
upload
start_relay
