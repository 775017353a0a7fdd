#!/usr/bin/env bash
# User-space instructions per request, counted by valgrind's callgrind: iamproxy's
# pass-through, cache-hit and cache-miss paths beside nginx and HAProxy proxying the same
# request to the same upstream. Instructions, unlike seconds, do not move with the load of
# a shared machine, so a change on the request path can be measured before and after.
#
#   benches/instructions/run.sh                      # every row
#   ONLY='iamproxy' benches/instructions/run.sh      # rows whose name matches
#   BIN=/tmp/old/iamproxy benches/instructions/run.sh  # another build (e.g. the base commit)
#
# For each row: start the proxy under callgrind, warm it up (WARMUP requests), zero the
# counters, send exactly REQUESTS requests over CONNECTIONS keep-alive connections
# (client.py), dump the counters, and divide. `hyper-minimal` is hyper's own floor
# (minimal_proxy.rs: hyper's HTTP/1 server and client connections and nothing else). Every request is the same form POST; only
# the path differs (and, for the cache miss, a new client id per request). The upstreams
# are nginx `return` blocks, outside the count. Everything is on 127.0.0.1, in a temporary
# directory removed on exit with every process started here.
#
# Knobs (environment):
#   REQUESTS     requests counted per row (2000)
#   CONNECTIONS  keep-alive connections they are spread over (16)
#   WARMUP       requests before the counters are zeroed (400)
#   ACCESS_LOG   on: iamproxy logs at info (access and decision lines, to a file) and nginx
#                writes its access log; off: neither does (off)
#   TRACING      a tracing.sample_ratio (e.g. 0.01): iamproxy runs with [tracing], exporting
#                to an nginx stand-in for the OTLP collector (outside the count); unset: no
#                [tracing] table
#   BIN          the iamproxy binary (default: cargo build --release, then target/release)
#   ONLY         extended regex: run only the rows whose name matches
#   PORT_BASE    first of the loopback ports used (29000; up to PORT_BASE+9)
#   PROFILE_DIR  keep each row's callgrind dump there as callgrind.<row>, for
#                `callgrind_annotate --inclusive=yes` (unset: dumps are thrown away)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

REQUESTS=${REQUESTS:-2000}
CONNECTIONS=${CONNECTIONS:-16}
WARMUP=${WARMUP:-400}
ACCESS_LOG=${ACCESS_LOG:-off}
BIN=${BIN:-}
TRACING=${TRACING:-}
ONLY=${ONLY:-}
PORT_BASE=${PORT_BASE:-29000}
PROFILE_DIR=${PROFILE_DIR:-}

P_UPSTREAM=$PORT_BASE           # Rails and the pre-authorize backend
P_IAM=$((PORT_BASE + 1))
P_PROXY=$((PORT_BASE + 2))      # the proxy under test
P_ADMIN=$((PORT_BASE + 3))
P_OTLP=$((PORT_BASE + 4))       # the OTLP collector's stand-in

BODY='grant_type=client_credentials&client_id=bench-app&scope=api'
MISS_BODY='grant_type=client_credentials&client_id=bench-miss-{i}&scope=api'
WARM_MISS_BODY='grant_type=client_credentials&client_id=bench-warm-{i}&scope=api'

WORK=$(mktemp -d /tmp/iamproxy-instructions.XXXXXX)
PIDS=()
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

install_missing() {
    local -a packages=()
    command -v valgrind >/dev/null || packages+=(valgrind)
    command -v nginx >/dev/null || packages+=(nginx-light)
    command -v haproxy >/dev/null || packages+=(haproxy)
    command -v curl >/dev/null || packages+=(curl ca-certificates)
    command -v python3 >/dev/null || packages+=(python3)
    if ((${#packages[@]})); then
        log "installing ${packages[*]}"
        local sudo=""
        ((EUID == 0)) || sudo=sudo
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends \
            "${packages[@]}" >/dev/null
    fi
}

wait_http() {
    for _ in $(seq 300); do
        curl -s -o /dev/null --max-time 1 "$1" && return
        sleep 0.1
    done
    die "$1 did not come up"
}

nginx_conf() {
    local name=$1 body=$2
    mkdir -p "$WORK/$name"
    ((EUID == 0)) && echo "user root;"
    cat <<EOF
pid $WORK/$name/nginx.pid;
error_log $WORK/$name/error.log warn;
worker_processes 1;
events { worker_connections 4096; }
http {
    client_body_temp_path $WORK/$name/body;
    proxy_temp_path $WORK/$name/proxy;
    fastcgi_temp_path $WORK/$name/fastcgi;
    uwsgi_temp_path $WORK/$name/uwsgi;
    scgi_temp_path $WORK/$name/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
$body
}
EOF
}

start_upstreams() {
    nginx_conf upstream "
    access_log off;
    server {
        listen 127.0.0.1:$P_UPSTREAM;
        location = /-/oauth/iam_routing {
            default_type application/vnd.gitlab-workhorse+json;
            return 200 '{\"destination\":\"iam\"}';
        }
        location / {
            default_type application/json;
            return 200 '{\"served_by\":\"rails\",\"projects\":[{\"id\":1,\"name\":\"bench\"}]}\n';
        }
    }
    server {
        listen 127.0.0.1:$P_OTLP;
        location = /v1/traces { return 200; }
    }
    server {
        listen 127.0.0.1:$P_IAM;
        location / {
            default_type application/json;
            return 200 '{\"served_by\":\"iam\",\"access_token\":\"giat_bench\",\"token_type\":\"Bearer\"}\n';
        }
    }" >"$WORK/upstream.conf"
    nginx -c "$WORK/upstream.conf" -g 'daemon off;' &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$P_UPSTREAM/"
    wait_http "http://127.0.0.1:$P_IAM/"
}

write_configs() {
    local access="access_log off;"
    [[ "$ACCESS_LOG" == on ]] && access="access_log $WORK/nginx-access.log;"
    nginx_conf proxy "
    $access
    proxy_http_version 1.1;
    proxy_set_header Connection \"\";
    upstream rails { server 127.0.0.1:$P_UPSTREAM; keepalive 128; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$P_PROXY;
        location / { proxy_pass http://rails; }
    }" >"$WORK/nginx.conf"

    cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
frontend proxy
    bind 127.0.0.1:$P_PROXY
    default_backend rails
backend rails
    http-reuse always
    server rails 127.0.0.1:$P_UPSTREAM
EOF

    head -c 32 /dev/urandom | base64 >"$WORK/secret"
    local level=warn
    [[ "$ACCESS_LOG" == on ]] && level=info
    cat >"$WORK/iamproxy.toml" <<EOF
[server]
listen = "127.0.0.1:$P_PROXY"
admin_listen = "127.0.0.1:$P_ADMIN"
[rails]
url = "http://127.0.0.1:$P_UPSTREAM"
[iam]
url = "http://127.0.0.1:$P_IAM"
[preauthorize]
url = "http://127.0.0.1:$P_UPSTREAM/-/oauth/iam_routing"
secret_file = "$WORK/secret"
[cache]
ttl = "1h"
[log]
level = "$level"
EOF
    if [[ -n "$TRACING" ]]; then
        cat >>"$WORK/iamproxy.toml" <<EOF
[tracing]
otlp_endpoint = "http://127.0.0.1:$P_OTLP/v1/traces"
sample_ratio = $TRACING
EOF
    fi
}

# Runs `$@` (the proxy) under callgrind and prints its instructions per request for the
# given method, path and body. The warm-up uses `warm_body`.
count() {
    local name=$1 path=$2 body=$3 warm_body=$4
    shift 4
    local out="$WORK/callgrind.$name"
    valgrind --tool=callgrind --callgrind-out-file="$out" "$@" \
        >"$WORK/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_http "http://127.0.0.1:$P_PROXY/-/warm"
    python3 "$HERE/client.py" "127.0.0.1:$P_PROXY" "$WARMUP" "$CONNECTIONS" POST "$path" "$warm_body" \
        || die "$name: warm-up failed (see $WORK/$name.log)"
    callgrind_control -z "$pid" >/dev/null 2>&1
    python3 "$HERE/client.py" "127.0.0.1:$P_PROXY" "$REQUESTS" "$CONNECTIONS" POST "$path" "$body" \
        || die "$name: requests failed"
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    # The dump after zeroing holds only the counted requests; its summary is the total Ir.
    local dump total
    dump=$(ls -t "$out".* 2>/dev/null | head -n 1)
    [[ -n "$dump" ]] || die "$name: no callgrind dump"
    total=$(awk '/^(summary|totals):/ { print $2; exit }' "$dump")
    [[ -z "$PROFILE_DIR" ]] || { mkdir -p "$PROFILE_DIR" && cp "$dump" "$PROFILE_DIR/callgrind.$name"; }
    printf '%-18s %10d\n' "$name" $((total / REQUESTS))
}

row() {
    local name=$1
    shift
    [[ -z "$ONLY" || "$name" =~ $ONLY ]] || return 0
    count "$name" "$@"
}

main() {
    install_missing
    if [[ -z "$BIN" ]]; then
        (cd "$REPO" && cargo build --release --locked >&2)
        BIN=$REPO/target/release/iamproxy
    fi
    cp "$BIN" "$WORK/iamproxy"
    if [[ -z "$ONLY" || hyper-minimal =~ $ONLY ]]; then
        (cd "$REPO" && cargo build --release --locked --example minimal_proxy >&2)
    fi
    start_upstreams
    write_configs
    local iamproxy=("$WORK/iamproxy" --config "$WORK/iamproxy.toml")
    log "instructions per request: $REQUESTS requests over $CONNECTIONS connections, access logs $ACCESS_LOG, tracing ${TRACING:-off}"
    printf '%-18s %10s\n' row 'Ir/request'
    row nginx /oauth/token "$BODY" "$BODY" \
        nginx -c "$WORK/nginx.conf" -g 'daemon off; master_process off;'
    row haproxy /oauth/token "$BODY" "$BODY" haproxy -db -f "$WORK/haproxy.cfg"
    row hyper-minimal /oauth/token "$BODY" "$BODY" \
        "$REPO/target/release/examples/minimal_proxy" "127.0.0.1:$P_PROXY" "127.0.0.1:$P_UPSTREAM"
    row iamproxy-pass /api/v4/projects "$BODY" "$BODY" "${iamproxy[@]}"
    row iamproxy-hit /oauth/token "$BODY" "$BODY" "${iamproxy[@]}"
    row iamproxy-miss /oauth/token "$MISS_BODY" "$WARM_MISS_BODY" "${iamproxy[@]}"
}

main "$@"
