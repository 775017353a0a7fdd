#!/usr/bin/env bash
# The end-to-end suite: openid-client drives real OAuth servers (oidc-provider as IAM,
# Doorkeeper in a minimal Rails app as Rails) through iamproxy, on loopback only.
#
#   bash tests/e2e/run.sh
#
# Installs what is missing on a fresh Debian machine that has only Rust: Node and npm (if
# `node` is missing: Debian's nodejs + npm), the npm packages pinned by package-lock.json
# (`npm ci`), and the Rails side's Debian packages (tests/e2e/rails/install.sh). The gateway
# is IAMPROXY_BIN, by default the repository's target/debug/iamproxy, and the tracing test's
# OTLP receiver OTLP_RECEIVER_BIN, by default target/debug/examples/otlp_receiver (each built
# here if missing). Exits non-zero when any test fails.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

log() { printf '\n== e2e: %s\n' "$*"; }

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  log "installing nodejs and npm from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
  echo "e2e: warning: node $(node --version); the suite is written for Node 20 (openid-client 6 needs it)" >&2
fi

# shellcheck source=rails/install.sh
source "$here/rails/install.sh"
rails_e2e_install

# npm ci only when node_modules does not match the lockfile yet.
stamp="$here/node_modules/.e2e-package-lock.json"
if ! cmp -s "$here/package-lock.json" "$stamp" 2>/dev/null; then
  log "npm ci"
  (cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$here/package-lock.json" "$stamp"
fi

export IAMPROXY_BIN="${IAMPROXY_BIN:-$repo/target/debug/iamproxy}"
if [ ! -x "$IAMPROXY_BIN" ]; then
  log "building the gateway (cargo build --locked --bin iamproxy)"
  (cd "$repo" && cargo build --locked --bin iamproxy)
fi
export OTLP_RECEIVER_BIN="${OTLP_RECEIVER_BIN:-$repo/target/debug/examples/otlp_receiver}"
if [ ! -x "$OTLP_RECEIVER_BIN" ]; then
  log "building the OTLP receiver (cargo build --locked --example otlp_receiver)"
  (cd "$repo" && cargo build --locked --example otlp_receiver)
fi

E2E_TMP="$(mktemp -d "${TMPDIR:-/tmp}/iamproxy-e2e.XXXXXX")"
export E2E_TMP E2E_PIDS_FILE="$E2E_TMP/pids"
status=1
test_pgid=""

# The test process stops everything it started, also when a test fails. This covers this
# script being interrupted or killed: the test runner's process group is stopped, then
# whatever the pids file still lists (a pid, or minus a process group id).
cleanup() {
  if [ -n "$test_pgid" ]; then
    kill -TERM -- "-$test_pgid" 2>/dev/null || true
  fi
  if [ -s "$E2E_PIDS_FILE" ]; then
    while read -r pid _name; do
      kill -TERM -- "$pid" 2>/dev/null || true
    done <"$E2E_PIDS_FILE"
    sleep 1
    while read -r pid _name; do
      kill -KILL -- "$pid" 2>/dev/null || true
    done <"$E2E_PIDS_FILE"
  fi
  if [ "$status" -ne 0 ]; then
    for f in "$E2E_TMP"/iamproxy.log "$E2E_TMP"/iamproxy-tracing.log "$E2E_TMP"/otlp_receiver.log "$E2E_TMP"/rails.log; do
      [ -f "$f" ] || continue
      echo "--- last lines of $(basename "$f") ---" >&2
      tail -n 40 "$f" >&2 || true
    done
  fi
  rm -rf "$E2E_TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "node --test (gateway: $IAMPROXY_BIN)"
cd "$here"
start=$SECONDS
# In the background, in its own process group (set -m), so a signal to this script runs the
# trap at once instead of after the tests.
set -m
node --test --test-concurrency=1 test/ &
test_pgid=$!
set +m
set +e
wait "$test_pgid"
status=$?
set -e
test_pgid=""
log "finished in $((SECONDS - start))s with status $status"
exit "$status"
