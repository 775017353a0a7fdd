#!/usr/bin/env bash
# Starts the Rails + Doorkeeper test app in the foreground on 127.0.0.1:$RAILS_E2E_PORT.
#   RAILS_E2E_PORT=<port> RAILS_E2E_CLIENTS=<clients.json> bash tests/e2e/rails/start.sh
# Ready when GET /-/health answers 200. Stops on SIGTERM/SIGINT. Logs to stdout/stderr.
# Optional: RAILS_E2E_LOG_LEVEL (info; debug shows SQL).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

: "${RAILS_E2E_PORT:?RAILS_E2E_PORT must be set}"
: "${RAILS_E2E_CLIENTS:?RAILS_E2E_CLIENTS must name the clients JSON file}"
[ -r "$RAILS_E2E_CLIENTS" ] || { echo "rails e2e: cannot read $RAILS_E2E_CLIENTS" >&2; exit 2; }
RAILS_E2E_CLIENTS="$(cd "$(dirname "$RAILS_E2E_CLIENTS")" && pwd)/$(basename "$RAILS_E2E_CLIENTS")"
export RAILS_E2E_CLIENTS RAILS_E2E_PORT

command -v puma >/dev/null || { echo "rails e2e: puma missing; run tests/e2e/rails/install.sh" >&2; exit 2; }

cd "$here"
# One thread: the app's one SQLite :memory: connection is shared by all requests.
# No Bundler, no gems from outside Debian: rubygems-integration finds Debian's gems.
export RAILS_ENV=production
exec puma --bind "tcp://127.0.0.1:${RAILS_E2E_PORT}" --threads 1:1 --environment production \
  --config /dev/null "$here/config.ru"
