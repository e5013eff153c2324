#!/bin/sh
# SSH example, `create`: the workspace directory on the host, the relay binary and credential
# copied over, and the relay started under nohup.
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"

say "creating workspace $WS_ID on $TARGET in $DIR"
remote "umask 077 && mkdir -p $(q "$DIR/bin") $(q "$DIR/workspace") $(q "$DIR/state")"
upload
start_relay
