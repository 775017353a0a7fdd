#!/usr/bin/env bash
# The fleet simulation at full size, by hand: N release gateway processes on loopback
# sharing one redis-server and one counting pre-authorize backend, 500 client ids, requests
# spread at random over the gateways for two cache lifetimes (cache.ttl = 5s), with and
# without redis.shared_cache, for N = 1, 4 and 16; then Redis stopped and started again in
# the middle of a run of the largest fleet. Prints one line per run ("fleet: …").
#
# It runs tests/fleet_simulation.rs (whose short version is part of the test suite) on a
# release build with these settings; override any of them from the environment:
#   FLEET_SIZES="1 4 16" FLEET_IDS=500 FLEET_TTL_SECS=5 FLEET_RATE=2000
#   FLEET_PREAUTH_MS=10 FLEET_REDIS_TIMEOUT=50ms
# Needs redis-server (Debian's package). About 3 minutes once built; the release build
# takes longer the first time.
set -euo pipefail
cd "$(dirname "$0")/../.."

export FLEET_SIZES="${FLEET_SIZES:-1 4 16}"
export FLEET_IDS="${FLEET_IDS:-500}"
export FLEET_TTL_SECS="${FLEET_TTL_SECS:-5}"
export FLEET_RATE="${FLEET_RATE:-2000}"
export FLEET_PREAUTH_MS="${FLEET_PREAUTH_MS:-10}"
export FLEET_REDIS_TIMEOUT="${FLEET_REDIS_TIMEOUT:-50ms}"

command -v redis-server >/dev/null || { echo "redis-server is needed (apt-get install redis-server)" >&2; exit 1; }
cargo test --locked --release --test fleet_simulation -- --nocapture --test-threads=1 2>&1 \
  | grep -oE 'fleet: .*|test result.*|panicked.*|assert.*'
