#!/bin/sh
# SSH example, shared part of create.sh, start.sh, stop.sh and delete.sh.
# ../render.sh inlines this file into every script of template.json, so each script runs alone
# under `sh -c` with only the environment the orchestrator gives it (see ../README.md).
#
# Per workspace, on the chosen host, in <workdir>/<workspace id>/ (mode 700):
#   bin/agentplane-relay   copied from the orchestrator (AGENTPLANE_RELAY_BINARY)
#   relay.creds            the relay's NATS credential, mode 600 (only when NATS has auth)
#   workspace/             the workspace files (the relay's root)
#   state/                 the relay's journal
#   relay.pid, relay.log   the running relay (started with nohup) and its output
# The remote login shell must be POSIX-like (sh, bash, dash, zsh, ksh).
set -eu
exec 2>&1 # one stream: the provisioning log keeps the order in which things happened

# ---- Operator settings: edit here, then run ../render.sh ----------------------------------
# The orchestrator passes no SSH_AUTH_SOCK to scripts: name the ssh-agent socket to use here.
# Empty = no agent; ssh then uses the identity_file parameter, or its default keys in
# $HOME/.ssh of the user the orchestrator runs as.
SSH_AGENT_SOCKET=""
# Host keys not seen before: "accept-new" records them on first use in $HOME/.ssh/known_hosts;
# "yes" (stricter) needs them there already, e.g. from a checked `ssh-keyscan`.
STRICT_HOST_KEY_CHECKING="accept-new"
# Where those host keys are kept; empty = ssh's default ($HOME/.ssh/known_hosts).
KNOWN_HOSTS_FILE=""
# The relay binary copied to the hosts; empty = AGENTPLANE_RELAY_BINARY. It must run on their
# CPU architecture and libc (e.g. set a static musl build here for mixed hosts).
RELAY_BINARY_OVERRIDE=""
CONNECT_TIMEOUT=15
# How long the relay gets to finish running tool calls on stop/delete before it is killed.
# shellcheck disable=SC2034 # used by stop.sh and delete.sh
STOP_TIMEOUT=30
# `delete` when the host cannot be reached (ssh fails to connect or log in): "yes" = the
# workspace is deleted anyway, with a warning naming what may be left on the host (so that a
# workspace on a machine that is gone for good can be deleted); "no" = delete fails until the
# host answers again.
# shellcheck disable=SC2034 # used by delete.sh
DELETE_WHEN_UNREACHABLE="yes"
# ---------------------------------------------------------------------------------------------

say() { printf '%s\n' "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}
need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed on the orchestrator host (or not on its PATH: $PATH)"
}

need ssh
need scp
need cksum

WS_ID=${AGENTPLANE_WORKSPACE_ID:?is not set: run this script through agentplane, or export it to test by hand}
NATS_URL=${AGENTPLANE_NATS_URL:?is not set: run this script through agentplane, or export it to test by hand}
NATS_PREFIX=${AGENTPLANE_NATS_PREFIX:-ap}
CREDS_FILE=${AGENTPLANE_RELAY_CREDS_FILE:-}
RELAY_BINARY=${RELAY_BINARY_OVERRIDE:-${AGENTPLANE_RELAY_BINARY:-}}

# Parameters (the orchestrator fills in the template's defaults; the fallbacks here only serve
# runs by hand and must match template.base.json).
HOST=${AGENTPLANE_PARAM_HOST:-localhost}
SSH_USER=${AGENTPLANE_PARAM_USER:-agentplane}
PORT=${AGENTPLANE_PARAM_PORT:-22}
WORKDIR=${AGENTPLANE_PARAM_WORKDIR:-agentplane-workspaces}
IDENTITY_FILE=${AGENTPLANE_PARAM_IDENTITY_FILE:-}

# The same checks as the template's, again: these values end up in ssh's arguments.
case "$WS_ID" in
  *[!A-Za-z0-9_-]*) die "unexpected workspace id '$WS_ID' (letters, digits, '-' and '_' only)" ;;
esac
printf '%s' "$HOST" | grep -Eq '^[A-Za-z0-9][A-Za-z0-9.:-]*$' || die "host '$HOST' is not a host name or address"
printf '%s' "$SSH_USER" | grep -Eq '^[A-Za-z_][A-Za-z0-9_.-]*$' || die "user '$SSH_USER' is not a user name"
PORT=${PORT%.0} # a JSON number may arrive as 22.0
case "$PORT" in
  "" | *[!0-9]*) die "port '$PORT' is not a port number" ;;
esac
if [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65535 ]; then
  die "port $PORT is out of range"
fi
printf '%s' "$WORKDIR" | grep -Eq '^[A-Za-z0-9._/][A-Za-z0-9._/-]*$' ||
  die "workdir '$WORKDIR' may hold only letters, digits and . _ / -"
case "/$WORKDIR/" in
  */../*) die "workdir '$WORKDIR' may not contain '..'" ;;
esac
case "$IDENTITY_FILE" in
  \~/*) IDENTITY_FILE="${HOME:-}/${IDENTITY_FILE#\~/}" ;;
esac
if [ -n "$IDENTITY_FILE" ]; then
  [ -r "$IDENTITY_FILE" ] || die "the identity file $IDENTITY_FILE is not readable on the orchestrator host"
fi
if [ -n "$SSH_AGENT_SOCKET" ]; then
  SSH_AUTH_SOCK=$SSH_AGENT_SOCKET
  export SSH_AUTH_SOCK
fi

# The workspace directory on the host (relative paths are relative to the user's home).
DIR="${WORKDIR%/}/$WS_ID"
case "$HOST" in
  *:*) SCP_HOST="[$HOST]" ;; # an IPv6 address
  *) SCP_HOST=$HOST ;;
esac
TARGET="$SSH_USER@$HOST:$PORT"

# Quotes one word for the remote shell.
q() {
  printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

# ssh or scp with the workspace's connection settings: never prompts, fails in time.
with_ssh_options() {
  tool=$1
  shift
  if [ -n "$IDENTITY_FILE" ]; then
    set -- -o IdentitiesOnly=yes -i "$IDENTITY_FILE" "$@"
  fi
  if [ -n "$KNOWN_HOSTS_FILE" ]; then
    set -- -o UserKnownHostsFile="$KNOWN_HOSTS_FILE" "$@"
  fi
  "$tool" -o BatchMode=yes -o ConnectTimeout="$CONNECT_TIMEOUT" \
    -o StrictHostKeyChecking="$STRICT_HOST_KEY_CHECKING" \
    -o ServerAliveInterval=15 -o ServerAliveCountMax=4 \
    -o User="$SSH_USER" -o Port="$PORT" "$@"
}

# Runs COMMAND (one string, for the remote shell) on the host; stdin passes through.
ssh_run() {
  rc=0
  with_ssh_options ssh -- "$HOST" "$1" || rc=$?
  case "$rc" in
    0) ;;
    255) die "ssh to $TARGET failed (connection or authentication; see above)" ;;
    *) die "the command on $HOST failed (exit code $rc)" ;;
  esac
}
# The same without stdin.
remote() {
  ssh_run "$1" </dev/null
}

# Runs a POSIX sh script, read from stdin, on the host with the given arguments; the first is
# always the workspace directory. The functions below are available to it.
remote_script() {
  args=""
  for arg in "$DIR" "$@"; do
    args="$args $(q "$arg")"
  done
  {
    cat <<'EOF'
set -eu
dir=$1
# The relay's pid, when relay.pid names a live agentplane-relay process.
relay_pid() {
  [ -f "$dir/relay.pid" ] || return 1
  pid=$(cat "$dir/relay.pid")
  case "$pid" in '' | *[!0-9]*) return 1 ;; esac
  kill -0 "$pid" 2>/dev/null || return 1
  if [ -r "/proc/$pid/cmdline" ]; then
    tr '\000' ' ' <"/proc/$pid/cmdline" | grep -q agentplane-relay || return 1
  else
    ps -p "$pid" -o args= 2>/dev/null | grep -q agentplane-relay || return 1
  fi
  printf '%s\n' "$pid"
}
# Stops the relay: SIGTERM (it lets running calls finish), SIGKILL after $1 seconds.
stop_relay() {
  if ! pid=$(relay_pid); then
    echo "no relay is running"
    rm -f "$dir/relay.pid"
    return 0
  fi
  echo "stopping the relay (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  waited=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$waited" -ge "$1" ]; then
      echo "the relay is still running after $1 s: killing it"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 1
    waited=$((waited + 1))
  done
  rm -f "$dir/relay.pid"
  echo "the relay has stopped"
}
EOF
    cat
  } | ssh_run "sh -s --$args"
}

# Copies the relay binary (when the host's copy differs) and the credential to the host.
upload() {
  [ -n "$RELAY_BINARY" ] || die "AGENTPLANE_RELAY_BINARY is not set"
  [ -f "$RELAY_BINARY" ] || die "the relay binary $RELAY_BINARY does not exist on the orchestrator host"
  bin="$DIR/bin/agentplane-relay"
  local_sum=$(cksum <"$RELAY_BINARY")
  remote_sum=$(remote "if [ -f $(q "$bin") ]; then cksum <$(q "$bin"); fi")
  if [ "$local_sum" = "$remote_sum" ]; then
    say "the relay binary on $HOST is up to date"
  else
    say "copying the relay binary $RELAY_BINARY to $HOST:$bin"
    with_ssh_options scp -q -- "$RELAY_BINARY" "$SCP_HOST:$bin.new" || die "scp to $TARGET failed"
    remote "chmod 700 $(q "$bin.new") && mv -f $(q "$bin.new") $(q "$bin")"
  fi
  if ! version=$(remote "$(q "$bin") --version"); then
    die "the relay binary does not run on $HOST ($(remote 'uname -sm' || true)); the orchestrator's is for $(uname -sm): set RELAY_BINARY_OVERRIDE to a build for the host"
  fi
  say "relay on $HOST: $version"
  if [ -n "$CREDS_FILE" ]; then
    [ -r "$CREDS_FILE" ] || die "cannot read the relay credential file $CREDS_FILE"
    say "copying the relay credential to $HOST:$DIR/relay.creds (mode 600, contents not shown)"
    with_ssh_options scp -q -- "$CREDS_FILE" "$SCP_HOST:$DIR/relay.creds.new" || die "scp to $TARGET failed"
    remote "chmod 600 $(q "$DIR/relay.creds.new") && mv -f $(q "$DIR/relay.creds.new") $(q "$DIR/relay.creds")"
  else
    say "NATS has no auth here (no AGENTPLANE_RELAY_CREDS_FILE): no credential to copy"
    remote "rm -f $(q "$DIR/relay.creds")"
  fi
}

# Starts the relay under nohup unless it is running, and waits briefly for it to serve.
start_relay() {
  creds=no
  [ -n "$CREDS_FILE" ] && creds=yes
  remote_script "$NATS_URL" "$NATS_PREFIX" "$WS_ID" "$creds" <<'EOF'
cd "$dir"
if pid=$(relay_pid); then
  echo "the relay is already running (pid $pid): keeping it"
  exit 0
fi
mkdir -p workspace state
if [ -f relay.log ] && [ "$(wc -c <relay.log)" -gt 10485760 ]; then
  mv -f relay.log relay.log.1
fi
: >>relay.log
seen=$(wc -l <relay.log)
AGENTPLANE_NATS_URL=$2
AGENTPLANE_NATS_PREFIX=$3
AGENTPLANE_WORKSPACE_ID=$4
AGENTPLANE_RELAY_ROOT="$(pwd)/workspace"
AGENTPLANE_RELAY_STATE_DIR="$(pwd)/state"
NO_COLOR=1
export AGENTPLANE_NATS_URL AGENTPLANE_NATS_PREFIX AGENTPLANE_WORKSPACE_ID AGENTPLANE_RELAY_ROOT \
  AGENTPLANE_RELAY_STATE_DIR NO_COLOR
unset AGENTPLANE_RELAY_CREDS AGENTPLANE_RELAY_CREDS_FILE
if [ "$5" = yes ]; then
  AGENTPLANE_RELAY_CREDS_FILE="$(pwd)/relay.creds"
  export AGENTPLANE_RELAY_CREDS_FILE
fi
nohup ./bin/agentplane-relay >>relay.log 2>&1 </dev/null &
echo "$!" >relay.pid
echo "started the relay (pid $!), logging to $(pwd)/relay.log"
# The orchestrator waits for the relay's hello itself; this puts the relay's own words (e.g. a
# refused credential or an unreachable NATS URL) into the provisioning log.
i=0
while [ "$i" -lt 15 ]; do
  if tail -n "+$((seen + 1))" relay.log | grep -q 'relay serving'; then
    echo "the relay is serving; the orchestrator now waits for its hello on NATS"
    exit 0
  fi
  if ! relay_pid >/dev/null; then
    echo "the relay has exited; its log:"
    tail -n "+$((seen + 1))" relay.log | tail -n 40
    exit 1
  fi
  i=$((i + 1))
  sleep 1
done
echo "warning: the relay has not reported serving yet; its log so far:"
tail -n "+$((seen + 1))" relay.log | tail -n 20
EOF
}
