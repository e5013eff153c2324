#!/bin/sh
# Docker example, `create`: a volume for the files and a container running the relay.
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"

say "creating workspace $WS_ID as container $NAME (image $IMAGE, $CPUS CPUs, ${MEMORY_MIB} MiB)"
ensure_running
