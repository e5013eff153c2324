#!/bin/sh
# SSH example, `delete`: stops the relay and removes the workspace directory with its files.
# A directory that is already gone counts as deleted, so deleting twice succeeds.
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$0")/lib.sh"

say "deleting workspace $WS_ID on $TARGET: the relay and $DIR"
rc=0
with_ssh_options ssh -- "$HOST" true </dev/null || rc=$?
if [ "$rc" -ne 0 ]; then
  if [ "$DELETE_WHEN_UNREACHABLE" = yes ]; then
    say "warning: $TARGET cannot be reached (ssh exit code $rc), so nothing was removed there."
    say "warning: if the workspace was ever created on it, stop the relay and remove $DIR by hand."
    exit 0
  fi
  die "$TARGET cannot be reached (ssh exit code $rc); try again when it answers"
fi
remote_script "$STOP_TIMEOUT" "$WS_ID" <<'EOF_REMOTE'
if [ ! -d "$dir" ]; then
  echo "there is no $dir on this host: nothing to delete"
  exit 0
fi
stop_relay "$2"
case "$dir" in
  */"$3") ;;
  *)
    echo "refusing to remove $dir: it does not end in the workspace id" >&2
    exit 1
    ;;
esac
rm -rf -- "$dir"
echo "removed $dir"
EOF_REMOTE
