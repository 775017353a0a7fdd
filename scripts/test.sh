#!/usr/bin/env bash
# Everything CI checks, runnable on a fresh machine that has only the Rust toolchain:
# formatting, clippy with warnings as errors, and the whole test suite (unit tests beside
# the code, integration tests on loopback sockets in tests/).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

# Debian packages the tests need: `kill` (procps) to signal the gateway process,
# `prometheus` for `promtool` (rule and metric checks) and the real server the
# observability test scrapes the gateway with, `redis-server` for fleet invalidation and the
# shared decision cache (TLS included: Debian's is built with it), `redis-sentinel` for
# the Sentinel failover test, and `systemd` for systemd-analyze.
need_apt=()
[ -x /bin/kill ] || [ -x /usr/bin/kill ] || need_apt+=(procps)
{ command -v promtool && command -v prometheus; } >/dev/null || need_apt+=(prometheus)
command -v redis-server >/dev/null || need_apt+=(redis-server)
# `systemd-analyze verify` checks the unit file in packaging/ (tests/systemd.rs).
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v redis-sentinel >/dev/null || need_apt+=(redis-sentinel)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
    log "installing rustup component ${component}"
    rustup component add "${component}"
  fi
done

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --locked --all-targets -- -D warnings

log "cargo test"
cargo test --locked --all-targets

# The Debian package: cargo-deb builds it (a release build; cargo-deb is installed when
# missing), dpkg installs it, the installed binary checks the installed configuration, and
# the package is purged.
log "Debian package (scripts/deb-test.sh)"
bash scripts/deb-test.sh

# Real OAuth servers (oidc-provider as IAM, Doorkeeper as Rails) and openid-client through
# the gateway binary `cargo test` just built; installs Node packages and Debian's Rails.
log "end-to-end suite (tests/e2e/run.sh)"
bash tests/e2e/run.sh

# Every fuzz target for a bounded time (IAMPROXY_FUZZ_SECS each, 0 skips), on the stable
# toolchain: see scripts/fuzz.sh.
bash scripts/fuzz.sh
