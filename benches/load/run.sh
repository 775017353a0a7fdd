#!/usr/bin/env bash
# Side-by-side load benchmark: the same workloads through the upstream directly, iamproxy,
# nginx (plain proxy_pass and auth_request routing) and HAProxy, on loopback.
#
#   benches/load/run.sh                          # full run (see README.md for its length)
#   DURATION=2 ROUNDS=1 benches/load/run.sh      # smoke run
#
# Knobs (environment):
#   DURATION     seconds per row per round (10)
#   ROUNDS       rounds over all rows; the table shows the median (3)
#   CONNECTIONS  connections for the throughput rows; for HTTP/2, streams in flight (64)
#   H2_CLIENTS   HTTP/2 connections, each with CONNECTIONS/H2_CLIENTS streams (8)
#   ACCESS_LOG   on: every proxy writes one access line per request to a file, as deployed
#                (iamproxy at log.level=info also writes its routing-decision line); off:
#                none does (iamproxy at log.level=warn) (on)
#   TRACING      a tracing.sample_ratio (e.g. 0.01): iamproxy runs with [tracing], exporting
#                to the Rails stand-in's /v1/traces (unset: no [tracing] table)
#   FILL         distinct client ids driven through the memory instance; 0 skips it (100000)
#   WARMUP       seconds of warm-up per row before round 1 (1)
#   PORT_BASE    first of the loopback ports used (28000; up to PORT_BASE+31)
#   PROXY_CPU    CPU the proxy under test is pinned to (0)
#   LOAD_CPU     CPU the load generator and the stand-in upstreams are pinned to (1)
#   RESULTS      where the output is saved (benches/load/results/latest.txt)
#   SKIP_BUILD   1: use the existing target/release/iamproxy (iterating on this script)
#   ONLY         extended regex: run only the rows whose name matches (e.g. 'nginx$|iamproxy-pass$')
#   INSTRUCTIONS 1: after the load rows, count instructions per request with
#                benches/instructions/run.sh on the same binary (about 6 minutes under
#                valgrind, and deterministic where req/s is not); 0: skip (1)
#
# Everything runs on 127.0.0.1, in a mktemp directory that is removed on exit together
# with every process started here. The pre-authorize secret is generated per run.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
H2_CLIENTS=${H2_CLIENTS:-8}
ACCESS_LOG=${ACCESS_LOG:-on}
TRACING=${TRACING:-}
FILL=${FILL:-100000}
INSTRUCTIONS=${INSTRUCTIONS:-1}
WARMUP=${WARMUP:-1}
PORT_BASE=${PORT_BASE:-28000}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
RESULTS=${RESULTS:-$HERE/results/latest.txt}
SKIP_BUILD=${SKIP_BUILD:-0}
ONLY=${ONLY:-}

# Loopback ports, one per listener.
P_RAILS=$((PORT_BASE + 0))      # stand-in Rails + pre-authorize backend (nginx return)
P_IAM=$((PORT_BASE + 1))        # stand-in IAM (nginx return)
P_RAILS_H2=$((PORT_BASE + 2))   # stand-in Rails over h2c: the HTTP/2 ceiling
P_NGINX=$((PORT_BASE + 10))     # nginx proxy_pass
P_NGINX_H2=$((PORT_BASE + 11))  # nginx proxy_pass, h2c listener
P_NGINX_AUTH=$((PORT_BASE + 12))   # nginx auth_request, subrequest cached
P_NGINX_NOCACHE=$((PORT_BASE + 13)) # nginx auth_request, no cache
P_HAPROXY=$((PORT_BASE + 15))
P_IAMPROXY=$((PORT_BASE + 20))
P_IAMPROXY_ADMIN=$((PORT_BASE + 21))
P_MEM=$((PORT_BASE + 30))       # the separate iamproxy of the memory measurement
P_MEM_ADMIN=$((PORT_BASE + 31))

PASS_PATH=/api/v4/projects
TOKEN_BODY='grant_type=client_credentials&client_id=bench-app'
TOKEN_BODY_UNIQUE='grant_type=client_credentials&client_id={id}'
AUTHORIZE_PATH='/oauth/authorize?client_id=bench-app&response_type=code'
AUTHORIZE_PATH_UNIQUE='/oauth/authorize?client_id={id}&response_type=code'

CLK_TCK=$(getconf CLK_TCK)
RUN_ID="r$(date +%s)-$$"
WORK=""
PIDS=()          # every background process started here, stopped on exit

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- setup ------------------------------------------------------------------------------

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    [[ -n "$WORK" ]] && rm -rf "$WORK"
}

# Installs what is missing, from Debian's packages.
install_missing() {
    local -a packages=()
    command -v nginx >/dev/null || packages+=(nginx-light)
    command -v haproxy >/dev/null || packages+=(haproxy)
    command -v wrk >/dev/null || packages+=(wrk)
    command -v h2load >/dev/null || packages+=(nghttp2-client)
    command -v taskset >/dev/null || packages+=(util-linux)
    command -v curl >/dev/null || packages+=(curl ca-certificates)
    command -v ss >/dev/null || packages+=(iproute2)
    if ((${#packages[@]})); then
        log "installing ${packages[*]}"
        local sudo=""
        ((EUID == 0)) || sudo=sudo
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends \
            "${packages[@]}" >/dev/null
    fi
}

# Builds the release binary and copies it aside, so a rebuild during the run (someone
# editing src/) cannot swap it. A build can fail while src/ is mid-edit: retry a few times.
build() {
    local attempt
    if [[ "$SKIP_BUILD" == 1 && -x "$REPO/target/release/iamproxy" ]]; then
        cp "$REPO/target/release/iamproxy" "$WORK/iamproxy"
        return
    fi
    for attempt in 1 2 3; do
        if (cd "$REPO" && cargo build --release --locked); then
            cp "$REPO/target/release/iamproxy" "$WORK/iamproxy"
            return
        fi
        log "build failed (attempt $attempt); retrying in 30s"
        sleep 30
    done
    die "cargo build --release --locked failed 3 times"
}

check_ports_free() {
    local port
    for port in "$P_RAILS" "$P_IAM" "$P_RAILS_H2" "$P_NGINX" "$P_NGINX_H2" "$P_NGINX_AUTH" \
        "$P_NGINX_NOCACHE" "$P_HAPROXY" "$P_IAMPROXY" "$P_IAMPROXY_ADMIN" "$P_MEM" "$P_MEM_ADMIN"; do
        if ss -Htln "sport = :$port" | grep -q .; then
            die "port $port is in use; set PORT_BASE"
        fi
    done
}

# Waits (at most 10 s) until $1 answers any HTTP status; else shows the log $2 and fails.
# Extra curl options (e.g. --http2-prior-knowledge) follow.
wait_http() {
    local url=$1 logfile=$2
    shift 2
    for _ in $(seq 100); do
        curl -s -o /dev/null --max-time 1 "$@" "$url" && return
        sleep 0.1
    done
    tail -n 20 "$logfile" >&2 || true
    die "$url did not come up"
}

# --- configurations --------------------------------------------------------------------

# nginx directives every instance here shares: its own prefix, pid file and temp paths,
# never the system configuration.
nginx_common() {
    local name=$1
    mkdir -p "$WORK/$name"
    # Workers must reach files in the 0700 work directory.
    ((EUID == 0)) && echo "user root;"
    cat <<EOF
pid $WORK/$name/nginx.pid;
error_log $WORK/logs/$name-error.log warn;
worker_processes 1;
events { worker_connections 4096; }
EOF
}

nginx_http_common() {
    local name=$1
    cat <<EOF
    client_body_temp_path $WORK/$name/body;
    proxy_temp_path $WORK/$name/proxy;
    fastcgi_temp_path $WORK/$name/fastcgi;
    uwsgi_temp_path $WORK/$name/uwsgi;
    scgi_temp_path $WORK/$name/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
EOF
}

# The stand-ins: Rails, the pre-authorize backend and IAM are nginx `return` blocks. The
# pre-authorize answer follows the README contract and also carries the destination in
# X-Destination, the only way nginx's auth_request can read it.
write_upstream_conf() {
    {
        nginx_common upstream
        cat <<EOF
http {
$(nginx_http_common upstream)
    access_log off;
    # Every named client goes to IAM; a lost client_id would show as rails in sanity_check.
    map \$arg_client_id \$destination { "" rails; default iam; }
    server {
        listen 127.0.0.1:$P_RAILS;
        listen 127.0.0.1:$P_RAILS_H2 http2;
        # The OTLP collector's stand-in, for TRACING.
        location = /v1/traces { return 200; }
        location = /-/oauth/iam_routing {
            default_type application/vnd.gitlab-workhorse+json;
            add_header X-Destination \$destination always;
            return 200 '{"destination":"\$destination"}';
        }
        location / {
            default_type application/json;
            return 200 '{"served_by":"rails","projects":[{"id":1,"name":"bench"}]}\n';
        }
    }
    server {
        listen 127.0.0.1:$P_IAM;
        location / {
            default_type application/json;
            return 200 '{"served_by":"iam","access_token":"giat_bench","token_type":"Bearer"}\n';
        }
    }
}
EOF
    } >"$WORK/upstream.conf"
}

# The nginx peers: plain proxy_pass (HTTP/1.1 and h2c), and auth_request routing on the
# query's client_id, with the decision subrequest cached per client_id or not at all.
write_nginx_proxy_conf() {
    local access_log="access_log off;"
    [[ "$ACCESS_LOG" == on ]] && access_log="access_log $WORK/logs/nginx-access.log;"
    {
        nginx_common proxy
        cat <<EOF
http {
$(nginx_http_common proxy)
    $access_log
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    upstream rails { server 127.0.0.1:$P_RAILS; keepalive 128; keepalive_requests 1000000; }
    upstream iam { server 127.0.0.1:$P_IAM; keepalive 128; keepalive_requests 1000000; }
    proxy_cache_path $WORK/proxy/decisions levels=1:2 keys_zone=decisions:64m inactive=10m;
    map \$decision \$oauth_upstream { iam iam; default rails; }

    server {
        listen 127.0.0.1:$P_NGINX;
        location / { proxy_pass http://rails; }
    }
    server {
        listen 127.0.0.1:$P_NGINX_H2 http2;
        location / { proxy_pass http://rails; }
    }
    server {
        listen 127.0.0.1:$P_NGINX_AUTH;
        location = /oauth/authorize {
            # The subrequest has no query of its own: it reads the id through this variable.
            set \$decision_client_id \$arg_client_id;
            auth_request /_decision;
            auth_request_set \$decision \$upstream_http_x_destination;
            proxy_pass http://\$oauth_upstream;
        }
        location = /_decision {
            internal;
            proxy_method POST;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_pass http://rails/-/oauth/iam_routing?client_id=\$decision_client_id;
            proxy_cache decisions;
            proxy_cache_key \$decision_client_id;
            proxy_cache_valid 200 60s;
            proxy_cache_lock on;
        }
        location / { proxy_pass http://rails; }
    }
    server {
        listen 127.0.0.1:$P_NGINX_NOCACHE;
        location = /oauth/authorize {
            # The subrequest has no query of its own: it reads the id through this variable.
            set \$decision_client_id \$arg_client_id;
            auth_request /_decision;
            auth_request_set \$decision \$upstream_http_x_destination;
            proxy_pass http://\$oauth_upstream;
        }
        location = /_decision {
            internal;
            proxy_method POST;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_pass http://rails/-/oauth/iam_routing?client_id=\$decision_client_id;
        }
        location / { proxy_pass http://rails; }
    }
}
EOF
    } >"$WORK/nginx-proxy.conf"
    mkdir -p "$WORK/proxy"
}

write_haproxy_cfg() {
    local global_log="" defaults_log=""
    if [[ "$ACCESS_LOG" == on ]]; then
        global_log="log stdout format raw local0 info"
        defaults_log=$'log global\n    option httplog'
    fi
    cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
    $global_log

defaults
    mode http
    $defaults_log
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend bench
    bind 127.0.0.1:$P_HAPROXY
    default_backend rails

backend rails
    server rails 127.0.0.1:$P_RAILS maxconn 1000
EOF
}

# $1 file, $2 listen port, $3 admin port, $4 cache.ttl, $5 cache.max_entries
write_iamproxy_toml() {
    local level=warn
    [[ "$ACCESS_LOG" == on ]] && level=info
    cat >"$1" <<EOF
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
shutdown_timeout = "2s"

[rails]
url = "http://127.0.0.1:$P_RAILS"

[iam]
url = "http://127.0.0.1:$P_IAM"

[preauthorize]
url = "http://127.0.0.1:$P_RAILS/-/oauth/iam_routing"
secret_file = "$WORK/workhorse_secret"

[cache]
ttl = "$4"
max_entries = $5

[log]
level = "$level"
EOF
    if [[ -n "$TRACING" ]]; then
        cat >>"$1" <<EOF

[tracing]
otlp_endpoint = "http://127.0.0.1:$P_RAILS/v1/traces"
sample_ratio = $TRACING
EOF
    fi
}

# --- processes ---------------------------------------------------------------------------

# Starts "$@" pinned to CPU $1, output appended to log $2; sets STARTED_PID.
start_pinned() {
    local cpu=$1 logfile=$2
    shift 2
    taskset -c "$cpu" "$@" >>"$logfile" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

start_all() {
    mkdir -p "$WORK/logs"
    head -c 32 /dev/urandom | base64 >"$WORK/workhorse_secret"
    chmod 600 "$WORK/workhorse_secret"

    write_upstream_conf
    write_nginx_proxy_conf
    write_haproxy_cfg
    # Main instance: cache.max_entries stays at its default (100000). The miss row sends
    # more new ids than that, so it also pays for evictions, as a flood of new ids would.
    write_iamproxy_toml "$WORK/iamproxy.toml" "$P_IAMPROXY" "$P_IAMPROXY_ADMIN" 60s 100000

    start_pinned "$LOAD_CPU" "$WORK/logs/upstream.out" \
        nginx -e "$WORK/logs/upstream-error.log" -p "$WORK/upstream/" -c "$WORK/upstream.conf" \
        -g "daemon off;"
    start_pinned "$PROXY_CPU" "$WORK/logs/nginx.out" \
        nginx -e "$WORK/logs/proxy-error.log" -p "$WORK/proxy/" -c "$WORK/nginx-proxy.conf" \
        -g "daemon off;"
    NGINX_PID=$STARTED_PID
    start_pinned "$PROXY_CPU" "$WORK/logs/haproxy.log" haproxy -db -f "$WORK/haproxy.cfg"
    HAPROXY_PID=$STARTED_PID
    start_pinned "$PROXY_CPU" "$WORK/logs/iamproxy.log" \
        "$WORK/iamproxy" --config "$WORK/iamproxy.toml"
    IAMPROXY_PID=$STARTED_PID

    local logs=$WORK/logs
    wait_http "http://127.0.0.1:$P_RAILS/" "$logs/upstream-error.log"
    wait_http "http://127.0.0.1:$P_IAM/" "$logs/upstream-error.log"
    wait_http "http://127.0.0.1:$P_RAILS_H2/" "$logs/upstream-error.log" --http2-prior-knowledge
    wait_http "http://127.0.0.1:$P_NGINX/" "$logs/proxy-error.log"
    wait_http "http://127.0.0.1:$P_HAPROXY/" "$logs/haproxy.log"
    wait_http "http://127.0.0.1:$P_IAMPROXY_ADMIN/-/readiness" "$logs/iamproxy.log"
}

# Fails loudly if a row would measure the wrong thing: each path must reach the upstream
# it is meant to (OAuth rows: IAM, by the pre-authorize answer; the rest: Rails).
sanity_check() {
    local url expect body
    while read -r expect url; do
        body=$(curl -s --max-time 2 "$url")
        [[ "$body" == *"\"served_by\":\"$expect\""* ]] || die "$url: expected $expect, got: $body"
    done <<EOF
rails http://127.0.0.1:$P_IAMPROXY$PASS_PATH
rails http://127.0.0.1:$P_NGINX$PASS_PATH
rails http://127.0.0.1:$P_HAPROXY$PASS_PATH
iam http://127.0.0.1:$P_NGINX_AUTH$AUTHORIZE_PATH
iam http://127.0.0.1:$P_NGINX_NOCACHE$AUTHORIZE_PATH
EOF
    [[ -n "$(find "$WORK/proxy/decisions" -type f)" ]] || die "nginx cached no decision"
    body=$(curl -s --max-time 2 -d "$TOKEN_BODY" "http://127.0.0.1:$P_IAMPROXY/oauth/token")
    [[ "$body" == *'"served_by":"iam"'* ]] || die "iamproxy /oauth/token: expected iam, got: $body"
    body=$(curl -s --max-time 2 --http2-prior-knowledge "http://127.0.0.1:$P_IAMPROXY$PASS_PATH")
    [[ "$body" == *'"served_by":"rails"'* ]] || die "iamproxy h2c: expected rails, got: $body"
    body=$(curl -s --max-time 2 --http2-prior-knowledge "http://127.0.0.1:$P_NGINX_H2$PASS_PATH")
    [[ "$body" == *'"served_by":"rails"'* ]] || die "nginx h2c: expected rails, got: $body"
}

# --- measuring ---------------------------------------------------------------------------

# utime+stime, in clock ticks, summed over the given pids.
cpu_ticks() {
    local pid total=0 t
    for pid in "$@"; do
        t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo "$total"
}

# Busy clock ticks of CPU $1 so far (steal included: the hypervisor running someone else).
cpu_busy_ticks() {
    awk -v c="cpu$1" '$1 == c {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
}

# Resets the peak resident set (VmHWM) of the given pids to their current RSS.
reset_peak() {
    local pid
    for pid in "$@"; do { echo 5 >"/proc/$pid/clear_refs"; } 2>/dev/null || true; done
}

# Sum of a /proc/<pid>/status field (kB) over the given pids.
status_kb() {
    local field=$1 pid total=0 v
    shift
    for pid in "$@"; do
        v=$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

# The rows. Each line: name group tool port mode peer
#   group: h1 (CONNECTIONS connections), h2 (h2load), c1 (one connection)
#   mode:  pass (GET PASS_PATH), token (POST /oauth/token, one client),
#          token-miss (a new client per request), authz / authz-miss (GET /oauth/authorize)
#   peer:  the row this one is compared with besides direct, nginx and HAProxy ("-": none)
ROWS="
direct              h1 wrk    $P_RAILS          pass       -
iamproxy-pass       h1 wrk    $P_IAMPROXY       pass       nginx
iamproxy-hit        h1 wrk    $P_IAMPROXY       token      nginx-auth-hit
iamproxy-miss       h1 wrk    $P_IAMPROXY       token-miss nginx-auth-nocache
nginx               h1 wrk    $P_NGINX          pass       -
haproxy             h1 wrk    $P_HAPROXY        pass       -
nginx-auth-hit      h1 wrk    $P_NGINX_AUTH     authz      -
nginx-auth-miss     h1 wrk    $P_NGINX_AUTH     authz-miss -
nginx-auth-nocache  h1 wrk    $P_NGINX_NOCACHE  authz-miss -
direct-h2           h2 h2load $P_RAILS_H2       pass       -
iamproxy-h2         h2 h2load $P_IAMPROXY       pass       nginx-h2
nginx-h2            h2 h2load $P_NGINX_H2       pass       -
direct-c1           c1 wrk    $P_RAILS          pass       -
iamproxy-pass-c1    c1 wrk    $P_IAMPROXY       pass       nginx-c1
iamproxy-hit-c1     c1 wrk    $P_IAMPROXY       token      nginx-c1
nginx-c1            c1 wrk    $P_NGINX          pass       -
haproxy-c1          c1 wrk    $P_HAPROXY        pass       -
"

row_names() { awk 'NF {print $1}' <<<"$ROWS" | grep -E -- "${ONLY:-.}"; }
row_field() { awk -v r="$1" -v f="$2" '$1 == r {print $f}' <<<"$ROWS"; }

# The processes whose CPU and memory a row measures ("" for direct rows).
row_pids() {
    case $1 in
    iamproxy*) echo "$IAMPROXY_PID" ;;
    # The master and its children (worker, cache manager; the cache loader exits after a
    # minute), looked up each time.
    nginx*) echo "$NGINX_PID" "$(ps -o pid= --ppid "$NGINX_PID" | tr '\n' ' ')" ;;
    haproxy*) echo "$HAPROXY_PID" ;;
    *) echo "" ;;
    esac
}

# Runs wrk for row $1 for $2 seconds, ids prefixed with $3; prints its BENCH line.
run_wrk() {
    local row=$1 seconds=$2 prefix=$3
    local group port mode conns=$CONNECTIONS path=$PASS_PATH
    group=$(row_field "$row" 2)
    port=$(row_field "$row" 4)
    mode=$(row_field "$row" 5)
    [[ "$group" == c1 ]] && conns=1
    local -a env=(BENCH_PREFIX="$prefix")
    case $mode in
    pass) ;;
    token)
        path=/oauth/token
        env+=(BENCH_METHOD=POST BENCH_BODY="$TOKEN_BODY")
        ;;
    token-miss)
        path=/oauth/token
        env+=(BENCH_METHOD=POST BENCH_BODY="$TOKEN_BODY_UNIQUE" BENCH_UNIQUE=1)
        ;;
    authz) path=$AUTHORIZE_PATH ;;
    authz-miss)
        path=/oauth/authorize
        env+=(BENCH_UNIQUE=1 BENCH_PATH="$AUTHORIZE_PATH_UNIQUE")
        ;;
    *) die "unknown mode $mode" ;;
    esac
    env "${env[@]}" taskset -c "$LOAD_CPU" wrk -t1 -c"$conns" -d"${seconds}s" --timeout 5s \
        -s "$HERE/wrk.lua" "http://127.0.0.1:$port$path" >"$WORK/wrk.out" 2>&1 || true
    grep '^BENCH ' "$WORK/wrk.out" || die "wrk gave no result for $row: $(cat "$WORK/wrk.out")"
}

# Runs h2load for row $1 for $2 seconds; prints a BENCH line like wrk.lua's, the
# percentiles computed from h2load's per-request log (start, status, microseconds).
run_h2load() {
    local row=$1 seconds=$2 port streams n p50=0 p99=0 errors non2xx
    port=$(row_field "$row" 4)
    streams=$((CONNECTIONS / H2_CLIENTS))
    ((streams >= 1)) || streams=1
    rm -f "$WORK/h2load.log"
    taskset -c "$LOAD_CPU" h2load -t1 -c"$H2_CLIENTS" -m"$streams" -D"$seconds" \
        --log-file="$WORK/h2load.log" "http://127.0.0.1:$port$PASS_PATH" >"$WORK/h2load.out" 2>&1 || true
    [[ -s "$WORK/h2load.log" ]] || die "h2load gave no result for $row: $(cat "$WORK/h2load.out")"
    # "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
    errors=$(awk '$1 == "requests:" {print $10 + $12 + $14}' "$WORK/h2load.out")
    non2xx=$(awk -F'\t' '$2 < 200 || $2 > 399' "$WORK/h2load.log" | wc -l)
    cut -f3 "$WORK/h2load.log" | sort -n >"$WORK/h2load.sorted"
    n=$(wc -l <"$WORK/h2load.sorted")
    p50=$(sed -n "$(((n + 1) / 2))p" "$WORK/h2load.sorted")
    p99=$(sed -n "$(((n * 99 + 99) / 100))p" "$WORK/h2load.sorted")
    echo "BENCH requests=$n duration_us=$((seconds * 1000000)) p50_us=$p50 p99_us=$p99 errors=${errors:-0} non2xx=$non2xx"
}

# Truncates the proxies' access logs so a long run cannot fill the disk.
truncate_logs() {
    local f
    for f in "$WORK/logs/iamproxy.log" "$WORK/logs/nginx-access.log" "$WORK/logs/haproxy.log"; do
        [[ -f "$f" ]] && : >"$f"
    done
    return 0
}

# Measures row $1 in round $2 and appends a line to the raw results.
measure() {
    local row=$1 round=$2 tool line pids cpu_before cpu_after busy_before busy_after hwm other
    tool=$(row_field "$row" 3)
    pids=$(row_pids "$row")
    # shellcheck disable=SC2086 # pids is a list
    reset_peak $pids
    # shellcheck disable=SC2086
    cpu_before=$(cpu_ticks $pids)
    busy_before=$(cpu_busy_ticks "$PROXY_CPU")
    if [[ "$tool" == wrk ]]; then
        line=$(run_wrk "$row" "$DURATION" "$RUN_ID-$round-")
    else
        line=$(run_h2load "$row" "$DURATION")
    fi
    # shellcheck disable=SC2086
    cpu_after=$(cpu_ticks $pids)
    busy_after=$(cpu_busy_ticks "$PROXY_CPU")
    # shellcheck disable=SC2086
    hwm=$(status_kb VmHWM $pids)
    [[ -n "$pids" ]] || hwm=0
    # What ran on the proxy's CPU besides the proxy: loopback softirq work, and anything
    # else on the machine (a build, the hypervisor's steal). High values mean noise.
    # Tick-sampled, so approximate: it can read about -10 at part load; clamped at 0.
    other=$((busy_after - busy_before - (cpu_after - cpu_before)))
    ((other >= 0)) || other=0
    truncate_logs
    # raw: row round requests duration_us p50 p99 errors non2xx cpu_ticks hwm_kb other_ticks
    # shellcheck disable=SC2086
    set -- $line
    local requests=${2#requests=} duration=${3#duration_us=} p50=${4#p50_us=} p99=${5#p99_us=}
    local errors=${6#errors=} non2xx=${7#non2xx=}
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$row" "$round" "$requests" \
        "$duration" "$p50" "$p99" "$errors" "$non2xx" $((cpu_after - cpu_before)) "$hwm" \
        "$other" >>"$WORK/raw.tsv"
    log "$(printf '%-19s round %s: %8.0f req/s  p50 %6s us  p99 %6s us  errors %s non-2xx %s  other on CPU %s: %s%%' \
        "$row" "$round" "$(awk -v r="$requests" -v d="$duration" 'BEGIN {print r / (d / 1e6)}')" \
        "$p50" "$p99" "$errors" "$non2xx" "$PROXY_CPU" \
        "$(awk -v o="$other" -v t="$CLK_TCK" -v d="$duration" 'BEGIN {printf "%.0f", o / t / (d / 1e6) * 100}')")"
}

warm_up() {
    local row tool
    ((WARMUP > 0)) || return 0
    log "warming up every row for ${WARMUP}s"
    for row in $(row_names); do
        tool=$(row_field "$row" 3)
        if [[ "$tool" == wrk ]]; then
            run_wrk "$row" "$WARMUP" "$RUN_ID-warm-" >/dev/null
        else
            run_h2load "$row" "$WARMUP" >/dev/null
        fi
    done
    truncate_logs
}

# Rounds over all rows; each round starts one row later, so no row always follows the same
# one, and slow drift (thermal, noisy neighbours) spreads over all rows alike.
run_rounds() {
    local -a rows
    mapfile -t rows < <(row_names)
    local n=${#rows[@]} round i
    for round in $(seq "$ROUNDS"); do
        for i in $(seq 0 $((n - 1))); do
            measure "${rows[$(((i + round - 1) % n))]}" "$round"
        done
    done
}

# --- memory ------------------------------------------------------------------------------

# A fresh iamproxy (cache.ttl 1h, max_entries 2 x FILL so nothing is evicted): VmRSS idle,
# then after FILL distinct client ids went through the cache-miss path.
measure_memory() {
    local toml="$WORK/iamproxy-mem.toml" pid idle after hwm entries calls
    write_iamproxy_toml "$toml" "$P_MEM" "$P_MEM_ADMIN" 1h $((FILL * 2))
    start_pinned "$PROXY_CPU" "$WORK/logs/iamproxy-mem.log" "$WORK/iamproxy" --config "$toml"
    pid=$STARTED_PID
    wait_http "http://127.0.0.1:$P_MEM_ADMIN/-/readiness" "$WORK/logs/iamproxy-mem.log"
    sleep 1
    idle=$(status_kb VmRSS "$pid")
    log "memory: filling the cache with $FILL client ids"
    # wrk cannot stop after N requests by itself: wrk.lua's ids cycle through FILL values,
    # and wrk is interrupted once the cache holds them all (at most 120 s).
    env BENCH_METHOD=POST BENCH_BODY="$TOKEN_BODY_UNIQUE" BENCH_UNIQUE=1 BENCH_LIMIT="$FILL" \
        BENCH_PREFIX="$RUN_ID-mem-" taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d120s \
        --timeout 5s -s "$HERE/wrk.lua" "http://127.0.0.1:$P_MEM/oauth/token" >/dev/null 2>&1 &
    local wrk_pid=$!
    PIDS+=("$wrk_pid")
    while kill -0 "$wrk_pid" 2>/dev/null; do
        calls=$(curl -s "http://127.0.0.1:$P_MEM_ADMIN/metrics" |
            awk '$1 ~ /^iamproxy_preauthorize_calls_total/ {s += $2} END {print s + 0}')
        ((calls >= FILL)) && break
        sleep 0.5
    done
    kill -INT "$wrk_pid" 2>/dev/null || true
    wait "$wrk_pid" 2>/dev/null || true
    sleep 1
    local metrics
    metrics=$(curl -s "http://127.0.0.1:$P_MEM_ADMIN/metrics")
    entries=$(awk '$1 == "iamproxy_decision_cache_entries" {print $2}' <<<"$metrics")
    calls=$(awk '$1 ~ /^iamproxy_preauthorize_calls_total/ {s += $2} END {print s + 0}' <<<"$metrics")
    after=$(status_kb VmRSS "$pid")
    hwm=$(status_kb VmHWM "$pid")
    kill -TERM "$pid" 2>/dev/null || true
    cat <<EOF

Memory (a fresh iamproxy, cache.ttl = 1h, cache.max_entries = $((FILL * 2)))
  VmRSS idle:                               $(awk -v k="$idle" 'BEGIN {printf "%.1f MiB", k / 1024}')
  VmRSS with ${entries:-?} cached decisions:       $(awk -v k="$after" 'BEGIN {printf "%.1f MiB", k / 1024}') (VmHWM $(awk -v k="$hwm" 'BEGIN {printf "%.1f MiB", k / 1024}'); target < 64 MiB)
  per cached decision:                      $(awk -v a="$after" -v i="$idle" -v n="${entries:-0}" 'BEGIN {if (n > 0) printf "%.0f bytes", (a - i) * 1024 / n; else print "?"}')
  pre-authorize calls made:                 $calls
EOF
}

# --- report ------------------------------------------------------------------------------

# Median of the numbers on stdin.
median() {
    sort -g | awk '{v[NR] = $1} END {if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

# Median over rounds of column $2 of raw results for row $1.
row_median() {
    awk -v r="$1" -v c="$2" -F'\t' '$1 == r {print $c}' "$WORK/raw.tsv" | median
}

row_rps_values() {
    awk -v r="$1" -F'\t' '$1 == r {print $3 / ($4 / 1e6)}' "$WORK/raw.tsv"
}

report() {
    local row group peer rps p50 p99 errors cpu hwm pids other
    local -A RPS P50
    for row in $(row_names); do
        RPS[$row]=$(row_rps_values "$row" | median)
        P50[$row]=$(row_median "$row" 5)
    done
    # Baselines per group: (direct, nginx, haproxy).
    local -A DIRECT=([h1]=direct [h2]=direct-h2 [c1]=direct-c1)
    local -A NGINX=([h1]=nginx [h2]=nginx-h2 [c1]=nginx-c1)
    local -A HAPROXY=([h1]=haproxy [h2]="" [c1]=haproxy-c1)

    echo
    echo "Throughput and latency: medians of $ROUNDS round(s) of ${DURATION}s; access logs $ACCESS_LOG"
    echo "h1: wrk -t1 -c$CONNECTIONS (HTTP/1.1); h2: h2load -c$H2_CLIENTS -m$((CONNECTIONS / H2_CLIENTS)) (h2c, prior knowledge); c1: wrk -t1 -c1"
    echo "x...: req/s relative to that row; peer: the row named in brackets; cpu%: the proxy's use of its"
    echo "CPU; other%: the rest of that CPU's busy time (loopback softirq, steal, anything else running)"
    echo
    printf '%-19s %9s %8s %8s %7s %7s %7s %-28s %10s %5s %7s %7s %6s\n' \
        row req/s p50_us p99_us xdirect xnginx xhaprxy "xpeer [peer]" cpu_s/100k cpu% other% rss_MiB errors
    for row in $(row_names); do
        group=$(row_field "$row" 2)
        peer=$(row_field "$row" 6)
        rps=${RPS[$row]}
        p50=${P50[$row]}
        p99=$(row_median "$row" 6)
        errors=$(awk -v r="$row" -F'\t' '$1 == r {s += $7 + $8} END {print s + 0}' "$WORK/raw.tsv")
        pids=$(row_pids "$row")
        if [[ -n "$pids" ]]; then
            cpu=$(awk -v r="$row" -v t="$CLK_TCK" -F'\t' '$1 == r && $3 > 0 {print $9 / t / $3 * 1e5}' "$WORK/raw.tsv" | median)
            cpu=$(printf '%.2f' "$cpu")
            local util
            util=$(awk -v r="$row" -v t="$CLK_TCK" -F'\t' '$1 == r {print $9 / t / ($4 / 1e6) * 100}' "$WORK/raw.tsv" | median)
            util=$(printf '%.0f' "$util")
            hwm=$(awk -v r="$row" -F'\t' '$1 == r && $10 > m {m = $10} END {printf "%.1f", m / 1024}' "$WORK/raw.tsv")
        else
            cpu=- util=- hwm=-
        fi
        other=$(awk -v r="$row" -v t="$CLK_TCK" -F'\t' '$1 == r {print $11 / t / ($4 / 1e6) * 100}' "$WORK/raw.tsv" | median)
        printf '%-19s %9.0f %8.0f %8.0f %7s %7s %7s %-28s %10s %5s %7.0f %7s %6s\n' \
            "$row" "$rps" "$p50" "$p99" \
            "$(ratio "$rps" "${RPS[${DIRECT[$group]}]:-}")" \
            "$(ratio "$rps" "${RPS[${NGINX[$group]}]:-}")" \
            "$(ratio "$rps" "${RPS[${HAPROXY[$group]:-none}]:-}")" \
            "$(peer_cell "$rps" "$peer" "${RPS[$peer]:-}")" \
            "$cpu" "$util" "$other" "$hwm" "$errors"
    done

    echo
    echo "One connection (wrk -t1 -c1), p50 added over direct-c1:"
    for row in iamproxy-pass-c1 iamproxy-hit-c1 nginx-c1 haproxy-c1; do
        [[ -n "${P50[$row]:-}" && -n "${P50[direct-c1]:-}" ]] || continue
        printf '  %-18s %+6d us  (p50 %.0f us vs %.0f us; target for iamproxy < 100 us)\n' "$row" \
            "$(awk -v a="${P50[$row]}" -v b="${P50[direct-c1]}" 'BEGIN {printf "%d", a - b}')" \
            "${P50[$row]}" "${P50[direct-c1]}"
    done
}

# "1.23" for $1/$2, "-" when there is no baseline.
ratio() {
    if [[ -z "${2:-}" || "${2:-0}" == 0 ]]; then
        echo -
    else
        awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'
    fi
}

peer_cell() {
    local rps=$1 peer=$2 peer_rps=$3
    if [[ "$peer" == - ]]; then echo -; else echo "$(ratio "$rps" "$peer_rps") [$peer]"; fi
}

machine() {
    echo "Machine: $(nproc) CPUs ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "Pinning: proxies on CPU $PROXY_CPU; wrk/h2load and the stand-in upstreams on CPU $LOAD_CPU"
    echo "Tools: $(nginx -v 2>&1 | sed 's/.*: //'), $(haproxy -v | head -1 | awk '{print "HAProxy " $3}'), $(wrk --version 2>&1 | head -1 | awk '{print "wrk " $2}'), $(h2load --version | head -1)"
    echo "iamproxy: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (work tree modified)')"
}

estimate_seconds() {
    local n
    n=$(row_names | wc -l)
    echo $((n * (ROUNDS * DURATION + WARMUP) + FILL / 5000 + 30))
}

main() {
    local started
    started=$(date +%s)
    install_missing
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/iamproxy-load.XXXXXX")
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    mkdir -p "$(dirname "$RESULTS")"
    # Everything printed from here on is also saved to RESULTS.
    exec > >(tee "$RESULTS") 2>&1

    log "building the release binary"
    build
    check_ports_free
    machine
    log "starting the upstream stand-ins and the proxies"
    start_all
    sanity_check
    echo "iamproxy threads when pinned to one CPU: $(status_kb Threads "$IAMPROXY_PID") (tokio sizes its workers from available_parallelism, which honours the affinity mask)"
    log "measuring: about $(estimate_seconds)s from here"
    local measure_start
    measure_start=$(date +%s)
    warm_up
    run_rounds
    report
    ((FILL > 0)) && measure_memory
    if ((INSTRUCTIONS)); then
        echo
        ACCESS_LOG=$ACCESS_LOG BIN=$REPO/target/release/iamproxy "$HERE/../instructions/run.sh"
    fi
    echo
    echo "Run took $(($(date +%s) - started))s in all ($(($(date +%s) - measure_start))s measuring)."
}

main "$@"
