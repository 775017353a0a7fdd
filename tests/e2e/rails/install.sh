#!/usr/bin/env bash
# Installs what the Rails + Doorkeeper test app needs, from Debian's packages only
# (no rubygems.org). Idempotent: does nothing when every package is already installed.
#
#   source tests/e2e/rails/install.sh && rails_e2e_install   # from run.sh
#   bash tests/e2e/rails/install.sh                          # alone
#
# Versions this was written against (Debian bookworm + bookworm-security):
#   ruby 3.1, ruby-rails 2:6.1.7.10+dfsg-1~deb12u3, ruby-doorkeeper 5.5.0-2+deb12u1,
#   ruby-sqlite3 1.4.2-4+b3, puma 5.6.5-3+deb12u2.

RAILS_E2E_APT_PACKAGES=(ruby-doorkeeper ruby-rails ruby-sqlite3 puma)

rails_e2e_install() {
  local missing=() pkg
  for pkg in "${RAILS_E2E_APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$pkg")
    fi
  done
  if [ ${#missing[@]} -eq 0 ]; then
    return 0
  fi
  echo "rails e2e: installing ${missing[*]} from Debian" >&2
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    ruby-doorkeeper ruby-rails ruby-sqlite3 puma
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  rails_e2e_install
fi
