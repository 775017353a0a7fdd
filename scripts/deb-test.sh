#!/usr/bin/env bash
# The Debian package, end to end: build it with cargo-deb (installed when missing), install
# it with dpkg, check what it installed (the binary with its version and commit, the unit,
# the conffile, the iamproxy user, no secret), run the installed `iamproxy --check` as the
# service user on the installed configuration with a secret made here, then purge it and
# check that it is gone. Needs root for dpkg (CI runs as root; elsewhere sudo is used).
#
#   scripts/deb-test.sh            # builds target/debian/iamproxy_*.deb (a release build)
#   DEB=path.deb scripts/deb-test.sh   # tests a package built before
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== deb-test: %s\n' "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

sudo=""
if ((EUID != 0)); then
    command -v sudo >/dev/null || fail "dpkg needs root, and there is no sudo"
    sudo=sudo
fi

need_apt=()
command -v dpkg-deb >/dev/null || need_apt+=(dpkg-dev)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
if ((${#need_apt[@]})); then
    log "installing ${need_apt[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

if dpkg-query -W -f='${Status}' iamproxy 2>/dev/null | grep -q installed; then
    fail "an iamproxy package is installed already; this test installs and purges its own"
fi

DEB=${DEB:-}
if [[ -z "$DEB" ]]; then
    if ! cargo deb --version >/dev/null 2>&1; then
        log "installing cargo-deb"
        cargo install --locked cargo-deb
    fi
    log "cargo deb (a release build)"
    # cargo-deb prints the package's path last (under CARGO_TARGET_DIR when that is set).
    DEB=$(cargo deb --no-dbgsym -- --locked | tail -n 1)
    [[ -f "$DEB" ]] || fail "cargo deb made no package ($DEB)"
fi
log "testing $DEB"

SECRET=/etc/iamproxy/.gitlab_workhorse_secret
CONFIG=/etc/iamproxy/iamproxy.toml
cleanup() {
    $sudo rm -f "$SECRET"
    if dpkg-query -W -f='${Status}' iamproxy 2>/dev/null | grep -q installed; then
        $sudo dpkg --purge iamproxy >/dev/null || true
    fi
}
trap cleanup EXIT

# What the package holds, before installing it.
contents=$(dpkg-deb --contents "$DEB")
for path in ./usr/bin/iamproxy ./lib/systemd/system/iamproxy.service "./etc/iamproxy/iamproxy.toml"; do
    grep -q " $path\$" <<<"$contents" || fail "the package has no $path"
done
if grep -E -q 'secret|token' <<<"$(awk '{print $NF}' <<<"$contents" | grep -v '^./usr/share/doc/')"; then
    fail "the package ships a secret or token file: $contents"
fi
[[ "$(dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./conffiles)" == "$CONFIG" ]] \
    || fail "$CONFIG is not the package's conffile"

log "dpkg -i"
$sudo dpkg -i "$DEB" >&2
[[ "$(dpkg-query -W -f='${Status}' iamproxy)" == "install ok installed" ]] || fail "not installed"

# The binary, with the version and commit it was built from.
version=$(/usr/bin/iamproxy --version)
want="iamproxy $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
[[ "$version" == "$want ("*")" ]] || fail "--version printed '$version', want '$want (<commit>)'"
if [[ -n "${IAMPROXY_GIT_COMMIT:-}" ]]; then
    commit=$IAMPROXY_GIT_COMMIT
else
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
fi
[[ "$version" == "$want ($commit)" ]] || fail "--version printed '$version', want commit $commit"
log "installed: $version"

# The service user, and who may read the configuration.
IFS=: read -r _ _ uid _ _ _ shell < <(getent passwd iamproxy) || fail "no iamproxy user"
((uid < 1000)) || fail "iamproxy is not a system user (uid $uid)"
[[ "$shell" == /usr/sbin/nologin ]] || fail "iamproxy's shell is $shell"
[[ "$(stat -c '%U:%G %a' /etc/iamproxy)" == "root:iamproxy 750" ]] \
    || fail "/etc/iamproxy is $(stat -c '%U:%G %a' /etc/iamproxy)"
[[ "$(stat -c '%U:%G %a' "$CONFIG")" == "root:iamproxy 640" ]] \
    || fail "$CONFIG is $(stat -c '%U:%G %a' "$CONFIG")"

# The installed unit is valid where it is installed (its ExecStart now exists).
verify=$(systemd-analyze verify /lib/systemd/system/iamproxy.service 2>&1) \
    || fail "systemd-analyze verify: $verify"
[[ -z "$verify" ]] || fail "systemd-analyze verify warns: $verify"

# No secret shipped: the installed configuration does not pass --check until one is made.
if out=$($sudo runuser -u iamproxy -- /usr/bin/iamproxy --config "$CONFIG" --check 2>&1); then
    fail "--check passed without a secret: $out"
fi
grep -q 'preauthorize.secret_file' <<<"$out" || fail "--check without a secret said: $out"

# A secret made now, as the README says, readable by the service user only.
head -c 32 /dev/urandom | base64 | $sudo tee "$SECRET" >/dev/null
$sudo chown root:iamproxy "$SECRET"
$sudo chmod 0640 "$SECRET"
out=$($sudo runuser -u iamproxy -- /usr/bin/iamproxy --config "$CONFIG" --check 2>&1) \
    || fail "--check as iamproxy on the installed configuration: $out"
log "$out"

log "dpkg --purge"
$sudo rm -f "$SECRET"
$sudo dpkg --purge iamproxy >&2
for path in /usr/bin/iamproxy /lib/systemd/system/iamproxy.service "$CONFIG" /etc/iamproxy; do
    [[ ! -e "$path" ]] || fail "$path is still there after the purge"
done
log "ok"
