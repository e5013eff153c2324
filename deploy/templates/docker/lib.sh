#!/bin/sh
# Docker example, shared part of create.sh, start.sh, stop.sh and delete.sh.
# ../render.sh inlines this file into every script of template.json, so each script runs alone
# under `sh -c` with only the environment the orchestrator gives it (see ../README.md).
#
# Per workspace, both named agentplane-<workspace id> and labelled agentplane.workspace=<id>:
#   volume     the workspace files (/agentplane/workspace) and relay journal (/agentplane/state)
#   container  runs agentplane-relay as its entrypoint; stopped and started with the workspace
set -eu
exec 2>&1 # one stream: the provisioning log keeps the order in which things happened

# ---- Operator settings: edit here, then run ../render.sh ----------------------------------
# Network of the workspace containers. "bridge" (Docker's default network): the relay reaches
# NATS at CONTAINER_NATS_URL below; the host is reachable as host.docker.internal. "host"
# (Linux only): the container shares the host's network, so nats://127.0.0.1:4222 works, and so
# does everything else listening on the host's loopback: choose it knowingly. Any other name
# is used as a user-defined network (e.g. one that the NATS container is attached to).
DOCKER_NETWORK="bridge"
# The NATS URL as seen from inside a container; empty = AGENTPLANE_NATS_URL (the orchestrator's
# nats.relay_url). With the bridge network, 127.0.0.1 is the container itself: use e.g.
# nats://host.docker.internal:4222 and let nats-server listen on the docker bridge too.
CONTAINER_NATS_URL=""
# Where agentplane-relay comes from: "orchestrator" = copied into the container (docker cp)
# from AGENTPLANE_RELAY_BINARY, so any image with a compatible libc and CPU architecture works
# (e.g. debian:bookworm-slim for a relay built on Debian 12); "image" = the image has it on
# its PATH (see ../image/Dockerfile).
RELAY_SOURCE="orchestrator"
# The Docker daemon: the scripts get no DOCKER_HOST from the orchestrator, so the docker CLI
# uses its default socket or the current context in $HOME/.docker. The credential is
# bind-mounted from the orchestrator's disk, so the daemon must run on the orchestrator's host.
DOCKER_HOST_URL=""
# How long the relay gets to finish running tool calls on `stop` before it is killed.
# shellcheck disable=SC2034 # used by stop.sh
STOP_TIMEOUT=30
# ---------------------------------------------------------------------------------------------

say() { printf '%s\n' "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}
need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed on the orchestrator host (or not on its PATH: $PATH)"
}
# Runs a command after saying what it is (the provisioning log shows every change); its own
# output (ids and names docker echoes) is dropped, its errors are not.
run() {
  say "+ $*"
  "$@" >/dev/null
}

need docker
need awk

ACTION=${AGENTPLANE_ACTION:-manual}
WS_ID=${AGENTPLANE_WORKSPACE_ID:?is not set: run this script through agentplane, or export it to test by hand}
NATS_URL=${CONTAINER_NATS_URL:-${AGENTPLANE_NATS_URL:?is not set: run this script through agentplane, or export it to test by hand}}
NATS_PREFIX=${AGENTPLANE_NATS_PREFIX:-ap}
CREDS_FILE=${AGENTPLANE_RELAY_CREDS_FILE:-}
RELAY_BINARY=${AGENTPLANE_RELAY_BINARY:-}

# Parameters (the orchestrator fills in the template's defaults; the fallbacks here only serve
# runs by hand and must match template.base.json).
IMAGE=${AGENTPLANE_PARAM_IMAGE:-debian:bookworm-slim}
CPUS=${AGENTPLANE_PARAM_CPUS:-1}
MEMORY_GIB=${AGENTPLANE_PARAM_MEMORY_GIB:-2}

case "$WS_ID" in
  *[!A-Za-z0-9_-]*) die "unexpected workspace id '$WS_ID' (letters, digits, '-' and '_' only)" ;;
esac
# Docker names allow [a-zA-Z0-9][a-zA-Z0-9_.-]*, which every agentplane id fits.
NAME="agentplane-$WS_ID"
printf '%s' "$IMAGE" | grep -Eq '^[A-Za-z0-9][A-Za-z0-9._/:@-]*$' ||
  die "image '$IMAGE' is not a valid image reference"
case "$CPUS" in
  *[!0-9.]* | "" | .* | *. | *.*.*) die "cpus '$CPUS' is not a positive number" ;;
esac
MEMORY_MIB=$(awk -v v="$MEMORY_GIB" 'BEGIN {
  if (v !~ /^[0-9]+([.][0-9]+)?$/ || v + 0 <= 0) exit 1
  n = int(v * 1024); if (n < v * 1024) n++
  print n
}') || die "memory_gib '$MEMORY_GIB' is not a positive number"

if [ -n "$DOCKER_HOST_URL" ]; then
  DOCKER_HOST=$DOCKER_HOST_URL
  export DOCKER_HOST
fi

# Absolute paths (docker needs them for bind mounts; the orchestrator's may be relative to its
# working directory, which the scripts share).
absolute() {
  case "$1" in
    /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$(pwd)" "$1" ;;
  esac
}

# Fails early and clearly when the daemon is out of reach.
check_daemon() {
  docker version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
    die "cannot reach the Docker daemon (docker version fails; is it running, and may $(id -un 2>/dev/null || echo this user) use it?): $(docker version 2>&1 | tail -n 1)"
}

# The container's state (created, running, exited, ...); empty when there is none.
container_state() {
  if s=$(docker container inspect --format '{{.State.Status}}' "$NAME" 2>/dev/null); then
    printf '%s' "$s"
  fi
}
volume_exists() {
  docker volume inspect "$NAME" >/dev/null 2>&1
}

create_container() {
  if [ -n "$CREDS_FILE" ]; then
    [ -r "$CREDS_FILE" ] || die "cannot read the relay credential file $CREDS_FILE"
    creds=$(absolute "$CREDS_FILE")
    case "$creds" in
      *,*) die "the credential path $creds contains a comma, which docker --mount cannot take" ;;
    esac
  fi
  case "$RELAY_SOURCE" in
    orchestrator)
      [ -n "$RELAY_BINARY" ] || die "AGENTPLANE_RELAY_BINARY is not set"
      [ -f "$RELAY_BINARY" ] || die "the relay binary $RELAY_BINARY does not exist on the orchestrator host"
      entrypoint=/usr/local/bin/agentplane-relay
      ;;
    image) entrypoint=agentplane-relay ;;
    *) die "RELAY_SOURCE must be orchestrator or image, not '$RELAY_SOURCE'" ;;
  esac
  case "$DOCKER_NETWORK" in
    host) ;;
    *) case "$NATS_URL" in
      *://127.* | *://localhost* | *://\[::1\]* | 127.* | localhost*)
        say "warning: the relay is to reach NATS at $NATS_URL, which inside a container on network '$DOCKER_NETWORK' is the container itself; set CONTAINER_NATS_URL (e.g. nats://host.docker.internal:4222) or DOCKER_NETWORK=host"
        ;;
    esac ;;
  esac
  # The options as positional parameters (POSIX sh has no arrays); nothing secret among them:
  # the credential stays in its file, mounted read-only.
  set -- --name "$NAME" \
    --label agentplane.workspace="$WS_ID" \
    --label agentplane.template="${AGENTPLANE_TEMPLATE_NAME:-}" \
    --restart unless-stopped --init \
    --network "$DOCKER_NETWORK" \
    --cpus "$CPUS" --memory "${MEMORY_MIB}m" \
    --mount "type=volume,source=$NAME,target=/agentplane" \
    --workdir /agentplane \
    --env AGENTPLANE_NATS_URL="$NATS_URL" \
    --env AGENTPLANE_NATS_PREFIX="$NATS_PREFIX" \
    --env AGENTPLANE_WORKSPACE_ID="$WS_ID" \
    --env AGENTPLANE_RELAY_ROOT=/agentplane/workspace \
    --env AGENTPLANE_RELAY_STATE_DIR=/agentplane/state \
    --env NO_COLOR=1 \
    --entrypoint "$entrypoint"
  if [ "$DOCKER_NETWORK" != host ]; then
    set -- "$@" --add-host host.docker.internal:host-gateway
  fi
  if [ -n "$CREDS_FILE" ]; then
    set -- "$@" --mount "type=bind,source=$creds,target=/run/agentplane/relay.creds,readonly" \
      --env AGENTPLANE_RELAY_CREDS_FILE=/run/agentplane/relay.creds
  fi
  run docker create "$@" "$IMAGE"
  if [ "$RELAY_SOURCE" = orchestrator ]; then
    run docker cp --follow-link "$RELAY_BINARY" "$NAME:$entrypoint"
  fi
}

# The container's log, since this run started it (all of it when it was already running).
relay_log() {
  if [ -n "$since" ]; then
    docker logs --since "$since" "$NAME" 2>&1
  else
    docker logs "$NAME" 2>&1
  fi
}

# Leaves the relay container running, creating it (and on `create` its volume) if needed.
ensure_running() {
  check_daemon
  since=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  state=$(container_state)
  if [ "$state" = created ]; then
    # Made by an earlier run that failed before starting it: nothing in it is worth keeping
    # (the files live in the volume), and it may lack the relay binary.
    say "container $NAME was created but never started: replacing it"
    run docker rm "$NAME"
    state=""
  fi
  case "$state" in
    running | restarting)
      say "container $NAME is already $state: keeping it"
      since=""
      ;;
    "")
      if volume_exists; then
        say "volume $NAME exists: the workspace files are kept"
      elif [ "$ACTION" = start ]; then
        die "volume $NAME is gone, and with it the workspace files; delete this workspace and create a new one"
      else
        run docker volume create --label agentplane.workspace="$WS_ID" "$NAME"
      fi
      create_container
      run docker start "$NAME"
      ;;
    *)
      say "container $NAME is $state"
      run docker start "$NAME"
      ;;
  esac
  # The orchestrator waits for the relay's hello itself; this puts the relay's own words
  # (e.g. a refused credential or an unreachable NATS URL) into the provisioning log, and fails
  # at once when the container cannot even run it.
  i=0
  while [ "$i" -lt 20 ]; do
    if relay_log | grep -q 'relay serving'; then
      say "the relay is serving; the orchestrator now waits for its hello on NATS"
      return 0
    fi
    state=$(container_state)
    if [ "$state" != running ]; then
      say "container $NAME is ${state:-gone}; its log:"
      docker logs --tail 40 "$NAME" 2>&1 || true
      die "the relay in container $NAME does not run"
    fi
    i=$((i + 1))
    sleep 1
  done
  say "warning: the relay has not reported serving yet; its log so far:"
  docker logs --tail 20 "$NAME" 2>&1 || true
}
