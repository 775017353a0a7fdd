#!/usr/bin/env bash
# Self-check of the Rails + Doorkeeper test app, with curl and no gateway: starts the app on a
# free loopback port with freshly generated clients, walks every flow of the contract
# (README.md), checks the app's own records, stops the app. Exits non-zero on any failure.
#   bash tests/e2e/rails/selfcheck.sh
# Conditions are passed to `check` in single quotes and evaluated there, so variables set just
# before a check are "unused" and "unexpanded" as far as shellcheck can tell:
# shellcheck disable=SC2016,SC2034
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# shellcheck source=install.sh
source "$here/install.sh"
rails_e2e_install
command -v openssl >/dev/null || { echo "selfcheck needs openssl" >&2; exit 2; }

work="$(mktemp -d)"
app_pid=""
cleanup() {
  if [ -n "$app_pid" ] && kill -0 "$app_pid" 2>/dev/null; then
    kill -TERM "$app_pid" 2>/dev/null || true
    wait "$app_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   - $*"; }
fail() { failed=$((failed + 1)); echo "FAIL - $*"; }
check() { # check DESCRIPTION 'SHELL CONDITION' (evaluated)
  if eval "$2"; then ok "$1"; else fail "$1"; fi
}
json() { # json FILE RUBY-EXPR  (the parsed document is j)
  ruby -rjson -e 'j = JSON.parse(File.read(ARGV[0])); v = eval(ARGV[1]); puts(v.is_a?(String) ? v : v.to_json)' "$1" "$2"
}
pkce() { # sets verifier and challenge (S256)
  verifier="$(openssl rand -hex 32)"
  challenge="$(printf %s "$verifier" | openssl dgst -sha256 -binary | base64 | tr '+/' '-_' | tr -d '=\n')"
}

port="$(ruby -rsocket -e 's = TCPServer.new("127.0.0.1", 0); puts s.addr[1]; s.close')"
base="http://127.0.0.1:${port}"
cb="http://127.0.0.1:9/callback"
id_a="rails-app-$(openssl rand -hex 4)"; secret_a="$(openssl rand -hex 24)"
id_b="other-app-$(openssl rand -hex 4)"; secret_b="$(openssl rand -hex 24)"
cat >"$work/clients.json" <<EOF
[{"client_id": "$id_a", "client_secret": "$secret_a", "redirect_uri": "$cb", "name": "Selfcheck A", "scopes": "api read_user"},
 {"client_id": "$id_b", "client_secret": "$secret_b", "redirect_uri": "$cb", "name": "Selfcheck B", "scopes": "api read_user"}]
EOF

t0="$(date +%s%N)"
RAILS_E2E_PORT="$port" RAILS_E2E_CLIENTS="$work/clients.json" bash "$here/start.sh" >"$work/app.log" 2>&1 &
app_pid=$!
ready=""
for _ in $(seq 1 300); do
  if curl -fsS -o /dev/null "$base/-/health" 2>/dev/null; then ready=1; break; fi
  kill -0 "$app_pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$ready" ]; then
  echo "the app did not become ready; its log:" >&2
  cat "$work/app.log" >&2
  exit 1
fi
echo "# ready after $(( ($(date +%s%N) - t0) / 1000000 )) ms on $base"

# req NAME CURL-ARGS...: body in $work/NAME.body, headers in $work/NAME.head, status in $status
req() {
  local name="$1"; shift
  status="$(curl -sS -o "$work/$name.body" -D "$work/$name.head" -w '%{http_code}' "$@")"
}
location() { sed -n 's/^[Ll]ocation: *//p' "$work/$1.head" | tr -d '\r'; }
query_param() { # query_param URL NAME
  ruby -ruri -e 'q = URI.decode_www_form(URI(ARGV[0]).query.to_s).to_h; puts q[ARGV[1]].to_s' "$1" "$2"
}
jar="$work/cookies"

req clear -X DELETE "$base/test/records"
check "DELETE /test/records answers 204" '[ "$status" = 204 ]'

# --- login redirect, login, consent page ---------------------------------------------------
cb_q="$(ruby -rcgi -e 'print CGI.escape(ARGV[0])' "$cb")"
pkce
authq="client_id=${id_a}&redirect_uri=${cb_q}&response_type=code&scope=api+read_user&state=st1&code_challenge=${challenge}&code_challenge_method=S256"
req noauth "$base/oauth/authorize?$authq"
check "authorize without a session: 302 to /test/login" \
  '[ "$status" = 302 ] && [[ "$(location noauth)" == */test/login ]]'

req login -c "$jar" -d username=alice "$base/test/login"
check "POST /test/login sets the session cookie" \
  '[ "$status" = 200 ] && grep -q _e2e_rails_session "$jar"'

req consent -b "$jar" "$base/oauth/authorize?$authq"
check "authorize with a session renders Doorkeeper's consent page" \
  '[ "$status" = 200 ] && grep -q "action=\"/oauth/authorize\"" "$work/consent.body" && grep -q "Selfcheck A" "$work/consent.body"'

consent_post() { # consent_post NAME JAR CLIENT_ID STATE SCOPE: sets redirect, code, got_state
  req "$1" -b "$2" --data-urlencode "client_id=$3" --data-urlencode "redirect_uri=$cb" \
    -d "state=$4" -d response_type=code --data-urlencode "scope=$5" \
    -d "code_challenge=$challenge" -d code_challenge_method=S256 "$base/oauth/authorize"
  redirect="$(location "$1")"
  code="$(query_param "$redirect" code)"
  got_state="$(query_param "$redirect" state)"
}
consent_post approve "$jar" "$id_a" st1 "api read_user"
check "consent POST: 302 to redirect_uri with code and state" \
  '[ "$status" = 302 ] && [[ "$redirect" == "$cb?"* ]] && [ -n "$code" ] && [ "$got_state" = st1 ]'

# --- code -> token, client_secret_basic, PKCE ----------------------------------------------
req badpkce -u "$id_a:$secret_a" -d grant_type=authorization_code -d "code=$code" \
  --data-urlencode "redirect_uri=$cb" -d "code_verifier=$(openssl rand -hex 32)" "$base/oauth/token"
err="$(json "$work/badpkce.body" 'j["error"]')"
check "token with a wrong code_verifier: 400 invalid_grant (PKCE enforced)" \
  '[ "$status" = 400 ] && [ "$err" = invalid_grant ]'

pkce
consent_post approve2 "$jar" "$id_a" st2 "api read_user"
req tok_basic -u "$id_a:$secret_a" -d grant_type=authorization_code -d "code=$code" \
  --data-urlencode "redirect_uri=$cb" -d "code_verifier=$verifier" "$base/oauth/token"
check "code -> token with PKCE, client_secret_basic: 200" '[ "$status" = 200 ]'
at1="$(json "$work/tok_basic.body" 'j["access_token"]')"
rt1="$(json "$work/tok_basic.body" 'j["refresh_token"]')"
scope1="$(json "$work/tok_basic.body" 'j["scope"]')"
check "access and refresh tokens issued, no IAM prefix" \
  '[ -n "$at1" ] && [ -n "$rt1" ] && [[ "$at1$rt1" != *giat_* && "$at1$rt1" != *ory_* ]]'
check "token scope is the requested 'api read_user'" '[ "$scope1" = "api read_user" ]'

req reuse -u "$id_a:$secret_a" -d grant_type=authorization_code -d "code=$code" \
  --data-urlencode "redirect_uri=$cb" -d "code_verifier=$verifier" "$base/oauth/token"
check "the same code a second time: 400" '[ "$status" = 400 ]'

# Same user, client and scopes while a token from the earlier consent is alive: Doorkeeper
# (and GitLab) skip the consent page and redirect with a code at once.
pkce
req autoapprove -b "$jar" "$base/oauth/authorize?client_id=${id_a}&redirect_uri=${cb_q}&response_type=code&scope=api+read_user&state=st4&code_challenge=${challenge}&code_challenge_method=S256"
check "GET authorize with a live matching token: no consent page, 302 with code" \
  '[ "$status" = 302 ] && [ -n "$(query_param "$(location autoapprove)" code)" ]'

# --- code -> token, client_secret_post, PKCE (another user: a consent page again) ----------
jar2="$work/cookies2"
req login2 -c "$jar2" -d username=bob "$base/test/login"
pkce
req consent2 -b "$jar2" "$base/oauth/authorize?client_id=${id_b}&redirect_uri=${cb_q}&response_type=code&state=st3&code_challenge=${challenge}&code_challenge_method=S256"
check "second application, no scope asked: consent page for the default scope api" \
  '[ "$status" = 200 ] && grep -q "name=\"scope\" id=\"scope\" value=\"api\"" "$work/consent2.body"'
consent_post approve3 "$jar2" "$id_b" st3 api
req tok_post -d grant_type=authorization_code -d "code=$code" --data-urlencode "redirect_uri=$cb" \
  -d "code_verifier=$verifier" -d "client_id=$id_b" -d "client_secret=$secret_b" "$base/oauth/token"
check "code -> token with PKCE, client_secret_post: 200" '[ "$status" = 200 ]'
at_b="$(json "$work/tok_post.body" 'j["access_token"]')"

# --- refresh ---------------------------------------------------------------------------------
req refresh -d grant_type=refresh_token -d "refresh_token=$rt1" -d "client_id=$id_a" -d "client_secret=$secret_a" "$base/oauth/token"
rt2="$(json "$work/refresh.body" 'j["refresh_token"].to_s')"
at2="$(json "$work/refresh.body" 'j["access_token"].to_s')"
check "refresh_token grant (client_secret_post): 200 with new tokens" \
  '[ "$status" = 200 ] && [ -n "$rt2" ] && [ "$rt2" != "$rt1" ] && [ -n "$at2" ]'
req api -H "Authorization: Bearer $at2" "$base/api/v4/user"
api_user="$(json "$work/api.body" 'j["username"]')"
check "GET /api/v4/user with the refreshed access token: alice" '[ "$status" = 200 ] && [ "$api_user" = alice ]'
req refresh_again -d grant_type=refresh_token -d "refresh_token=$rt1" -d "client_id=$id_a" -d "client_secret=$secret_a" "$base/oauth/token"
check "the old refresh token after the new access token was used: 400" '[ "$status" = 400 ]'
req api_cc -H "Authorization: Bearer $at_b" "$base/api/v4/user"
check "GET /api/v4/user with bob's token: bob" '[ "$status" = 200 ] && grep -q "\"bob\"" "$work/api_cc.body"'
req api_none "$base/api/v4/user"
check "GET /api/v4/user without a token: 401" '[ "$status" = 401 ]'
req refresh_other -u "$id_b:$secret_b" -d grant_type=refresh_token -d "refresh_token=$rt2" "$base/oauth/token"
check "refresh with another client's credentials: 400" '[ "$status" = 400 ]'

# --- introspection ---------------------------------------------------------------------------
req intro -u "$id_a:$secret_a" -d "token=$at2" "$base/oauth/introspect"
active="$(json "$work/intro.body" 'j["active"]')"
intro_client="$(json "$work/intro.body" 'j["client_id"]')"
check "introspect own token (client_secret_basic): active, its client_id" \
  '[ "$status" = 200 ] && [ "$active" = true ] && [ "$intro_client" = "$id_a" ]'
req intro_post -d "token=$at_b" -d "client_id=$id_b" -d "client_secret=$secret_b" "$base/oauth/introspect"
active="$(json "$work/intro_post.body" 'j["active"]')"
check "introspect own token (client_secret_post): active" '[ "$status" = 200 ] && [ "$active" = true ]'
req intro_other -u "$id_b:$secret_b" -d "token=$at2" "$base/oauth/introspect"
active="$(json "$work/intro_other.body" 'j["active"]')"
check "introspect another client's token: active false" '[ "$status" = 200 ] && [ "$active" = false ]'
req intro_anon -d "token=$at2" "$base/oauth/introspect"
err="$(json "$work/intro_anon.body" 'j["error"]')"
check "introspect without client authentication: 400 invalid_request" \
  '[ "$status" = 400 ] && [ "$err" = invalid_request ]'

# --- revocation ------------------------------------------------------------------------------
req revoke_other -u "$id_b:$secret_b" -d "token=$at2" "$base/oauth/revoke"
check "revoke another client's token: 403" '[ "$status" = 403 ]'
req revoke -u "$id_a:$secret_a" -d "token=$at2" "$base/oauth/revoke"
check "revoke own token: 200" '[ "$status" = 200 ]'
req intro_revoked -u "$id_a:$secret_a" -d "token=$at2" "$base/oauth/introspect"
active="$(json "$work/intro_revoked.body" 'j["active"]')"
check "revoked token introspects as inactive" '[ "$active" = false ]'

# --- client credentials, bad secret ----------------------------------------------------------
req cc -u "$id_a:$secret_a" -d grant_type=client_credentials "$base/oauth/token"
cc_rt="$(json "$work/cc.body" 'j["refresh_token"].to_s')"
check "client_credentials grant: 200, no refresh token" '[ "$status" = 200 ] && [ -z "$cc_rt" ]'
req badsecret -u "$id_a:wrong" -d grant_type=client_credentials "$base/oauth/token"
err="$(json "$work/badsecret.body" 'j["error"]')"
check "wrong client secret: 401 invalid_client" '[ "$status" = 401 ] && [ "$err" = invalid_client ]'

# --- no device grant in Debian's Doorkeeper -------------------------------------------------
req device -d "client_id=$id_a" -d scope=api "$base/oauth/authorize_device"
check "POST /oauth/authorize_device: 404 (no device grant)" '[ "$status" = 404 ]'

# --- the app's own records -------------------------------------------------------------------
req records "$base/test/records"
expected="$(cat <<EXPECTED
GET /oauth/authorize $id_a - 302
GET /oauth/authorize $id_a - 200
POST /oauth/authorize $id_a - 302
POST /oauth/token $id_a authorization_code 400
POST /oauth/authorize $id_a - 302
POST /oauth/token $id_a authorization_code 200
POST /oauth/token $id_a authorization_code 400
GET /oauth/authorize $id_a - 302
GET /oauth/authorize $id_b - 200
POST /oauth/authorize $id_b - 302
POST /oauth/token $id_b authorization_code 200
POST /oauth/token $id_a refresh_token 200
POST /oauth/token $id_a refresh_token 400
POST /oauth/token $id_b refresh_token 400
POST /oauth/introspect $id_a - 200
POST /oauth/introspect $id_b - 200
POST /oauth/introspect $id_b - 200
POST /oauth/introspect - - 400
POST /oauth/revoke $id_b - 403
POST /oauth/revoke $id_a - 200
POST /oauth/introspect $id_a - 200
POST /oauth/token $id_a client_credentials 200
POST /oauth/token $id_a client_credentials 401
POST /oauth/authorize_device $id_a - 404
EXPECTED
)"
got="$(json "$work/records.body" 'j.map { |r| [r["method"], r["path"], r["client_id"] || "-", r["grant_type"] || "-", r["status"]].join(" ") }.join("\n")')"
if [ "$got" = "$expected" ]; then
  ok "GET /test/records lists every /oauth request in order (method, path, client_id, grant_type, status)"
else
  fail "GET /test/records"
  diff <(echo "$expected") <(echo "$got") || true
fi
authn="$(json "$work/records.body" '[j.first, j.find { |r| r["status"] == 200 && r["path"] == "/oauth/token" }, j.find { |r| r["status"] == 401 }].map { |r| r && r["client_authenticated"] }')"
check "records note Doorkeeper's client authentication outcome" '[ "$authn" = "[null,true,false]" ]'
only_oauth="$(json "$work/records.body" 'j.all? { |r| r["path"].start_with?("/oauth/") }')"
check "records hold only /oauth requests (no /test/login, /-/health)" '[ "$only_oauth" = true ]'
req clear2 -X DELETE "$base/test/records"
req records2 "$base/test/records"
check "DELETE /test/records clears them" '[ "$(cat "$work/records2.body")" = "[]" ]'

# --- stops on SIGTERM ------------------------------------------------------------------------
kill -TERM "$app_pid"
stopped=""
for _ in $(seq 1 100); do
  kill -0 "$app_pid" 2>/dev/null || { stopped=1; break; }
  sleep 0.1
done
check "stops on SIGTERM" '[ -n "$stopped" ]'
wait "$app_pid" 2>/dev/null || true
app_pid=""

echo "${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]
