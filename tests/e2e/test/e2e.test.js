// End-to-end: openid-client drives real OAuth servers through iamproxy — oidc-provider as IAM,
// Doorkeeper in a minimal Rails app as Rails — and each step is checked against the records
// of the server that must have served it (never the gateway's own account).
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import { Browser } from '../lib/browser.js';
import { REDIRECT_URI, startEnv } from '../lib/env.js';
import {
  assertNothingServed, assertServed, clientConfig, codeFlow, beginCodeFlow, deviceFlow, exchange,
  introspect, oauthOnly, refresh, revoke, DEVICE_GRANT,
} from '../lib/flows.js';
import { metricValue } from '../lib/gateway.js';
import { IAM_PREFIX, IAM_SERVICE_NAME } from '../lib/iam.js';
import {
  formatSpans, isChildOf, randomTraceparent, startReceiver,
} from '../lib/otlp.js';
import { signJwt } from '../lib/preauthorize.js';

const METHODS = ['client_secret_basic', 'client_secret_post'];
const T = { timeout: 90_000 };

let env;

before(async () => {
  env = await startEnv();
}, { timeout: 300_000 });

after(async () => {
  await env?.stop();
});

async function clearRecords() {
  env.iam.clearRecords();
  await env.rails.clearRecords();
  env.preauthorize.clearCalls();
}

const iamRecords = () => oauthOnly(env.iam.records);
const railsRecords = async () => oauthOnly(await env.rails.records());

/** The steps of a code flow, refresh, introspection and revocation as one server sees them. */
async function codeFlowAndFriends(app, method) {
  const config = clientConfig(env, app, method);
  const flow = await codeFlow(config);
  const { tokens } = flow;
  assert.ok(tokens.access_token, 'access token');
  assert.ok(tokens.refresh_token, 'refresh token');
  assert.equal(tokens.token_type.toLowerCase(), 'bearer');

  const refreshed = await refresh(config, tokens.refresh_token);
  assert.ok(refreshed.access_token, 'access token from the refresh');
  assert.notEqual(refreshed.access_token, tokens.access_token);
  const refreshToken = refreshed.refresh_token ?? tokens.refresh_token;

  const active = await introspect(config, refreshed.access_token);
  assert.equal(active.active, true, `introspection: ${JSON.stringify(active)}`);
  if (active.client_id !== undefined) assert.equal(active.client_id, app.client_id);

  await revoke(config, refreshToken);
  const revoked = await introspect(config, refreshToken);
  assert.equal(revoked.active, false, `revoked refresh token still active: ${JSON.stringify(revoked)}`);
  // Revoke the first access token too: Doorkeeper skips the consent page for a user who
  // still holds a live token of the application, and every flow here should show it.
  await revoke(config, tokens.access_token);
  return { flow, tokens, refreshed, refreshToken };
}

const TOKEN_STEPS = [
  { method: 'POST', path: '/oauth/token', grant_type: 'authorization_code' },
  { method: 'POST', path: '/oauth/token', grant_type: 'refresh_token' },
  { method: 'POST', path: '/oauth/introspect' },
  { method: 'POST', path: '/oauth/revoke' },
  { method: 'POST', path: '/oauth/introspect' },
  { method: 'POST', path: '/oauth/revoke' },
];

// IAM's authorization endpoint: the request, then the browser coming back through the
// gateway with the login verifier and the consent verifier (DESIGN §3).
const IAM_AUTHORIZE_STEPS = [
  { method: 'GET', path: '/oauth/authorize', verifier: null },
  { method: 'GET', path: '/oauth/authorize', verifier: 'login' },
  { method: 'GET', path: '/oauth/authorize', verifier: 'consent' },
];

const RAILS_AUTHORIZE_STEPS = [
  { method: 'GET', path: '/oauth/authorize' },
  { method: 'POST', path: '/oauth/authorize' },
];

describe('pre-authorize backend (DESIGN §4)', () => {
  it('refuses a missing, forged or wrong-issuer JWT with 401 and answers a good one', async () => {
    const post = (jwt) => fetch(`${env.preauthorize.url}?client_id=${env.apps.iam.client_id}`, {
      method: 'POST',
      headers: jwt ? { 'gitlab-workhorse-api-request': jwt } : {},
    });
    const now = Math.floor(Date.now() / 1000);
    assert.equal((await post()).status, 401);
    assert.equal((await post(signJwt({ iss: 'gitlab-workhorse', iat: now }, Buffer.alloc(32, 7)))).status, 401);
    assert.equal((await post(signJwt({ iss: 'someone-else', iat: now }, env.secret))).status, 401);
    assert.equal((await post(signJwt({ iss: 'gitlab-workhorse', iat: now - 3600 }, env.secret))).status, 401);
    const ok = await post(signJwt({ iss: 'gitlab-workhorse', iat: now }, env.secret));
    assert.equal(ok.status, 200);
    assert.equal(ok.headers.get('content-type'), 'application/vnd.gitlab-workhorse+json');
    assert.deepEqual(await ok.json(), { destination: 'iam' });
  });
});

describe('application routed to IAM', () => {
  for (const method of METHODS) {
    it(`authorization code + PKCE (${method}), refresh, introspection, revocation: all served by IAM`, T, async () => {
      await clearRecords();
      const app = env.apps.iam;
      const { flow, tokens, refreshToken } = await codeFlowAndFriends(app, method);

      const code = new URL(flow.callback).searchParams.get('code');
      assert.ok(code.startsWith(IAM_PREFIX), 'IAM-issued code carries the IAM prefix');
      assert.ok(tokens.refresh_token.startsWith(IAM_PREFIX), 'IAM-issued refresh token carries the IAM prefix');
      assert.ok(tokens.access_token.startsWith(IAM_PREFIX), 'IAM-issued access token carries the IAM prefix');
      assert.ok(refreshToken.startsWith(IAM_PREFIX));
      assert.equal(new URL(flow.callback).searchParams.get('iss'), env.gateway.origin, 'IAM names the gateway as its issuer');

      const iam = iamRecords();
      assertServed('IAM', iam, [...IAM_AUTHORIZE_STEPS, ...TOKEN_STEPS], app.client_id, { exact: true });
      for (const r of iam.filter((x) => x.method === 'POST')) {
        assert.equal(r.auth, method, `IAM saw ${r.path} authenticated with ${r.auth}`);
      }
      for (const r of iam) assert.equal(r.forwarded_host, new URL(env.gateway.origin).host, 'came through the gateway');
      assertNothingServed('Rails', await railsRecords());

      // The gateway asked the pre-authorize backend with a valid Workhorse JWT.
      const asked = env.preauthorize.calls.filter((c) => c.client_id === app.client_id);
      for (const c of asked) {
        assert.equal(c.jwt, 'ok');
        assert.equal(c.forwarded_cookie, false);
        assert.equal(c.forwarded_authorization, false);
      }
    });
  }

  it('device authorization with polling: served by IAM', T, async () => {
    await clearRecords();
    const app = env.apps.iam;
    const config = clientConfig(env, app, 'client_secret_basic');
    const polls = () => iamRecords().filter((r) => r.grant_type === DEVICE_GRANT).length;
    const { response, tokens } = await deviceFlow(config, {
      pollsSeen: async () => polls(),
      // verification_uri names the gateway (IAM builds it from X-Forwarded-Host), but
      // /oauth/device is not an OAuth path for the gateway (DESIGN §1): it would reach Rails.
      // The user opens IAM's own device page instead.
      approve: async (r) => {
        const page = new URL(r.verification_uri_complete);
        assert.equal(page.origin, env.gateway.origin);
        await new Browser().run(new URL(page.pathname + page.search, env.iam.origin).href);
      },
    });
    assert.ok(response.device_code.startsWith(IAM_PREFIX), 'IAM-issued device code carries the IAM prefix');
    assert.ok(tokens.access_token.startsWith(IAM_PREFIX));
    assert.ok(tokens.refresh_token.startsWith(IAM_PREFIX));

    // What came through the gateway (the user's device pages did not: see above).
    const viaGateway = iamRecords().filter((r) => r.forwarded_host === new URL(env.gateway.origin).host);
    assert.ok(iamRecords().some((r) => r.path === '/oauth/device' && r.forwarded_host === null));
    assertServed('IAM', viaGateway, [
      { method: 'POST', path: '/oauth/authorize_device' },
      { method: 'POST', path: '/oauth/token', grant_type: DEVICE_GRANT, status: 400 },
      { method: 'POST', path: '/oauth/token', grant_type: DEVICE_GRANT, status: 200 },
    ], app.client_id, { exact: true });
    assertNothingServed('Rails', await railsRecords());
  });
});

describe('application routed to Rails', () => {
  for (const method of METHODS) {
    it(`authorization code + PKCE (${method}), refresh, introspection, revocation: all served by Rails`, T, async () => {
      await clearRecords();
      const app = env.apps.rails;
      const { flow, tokens } = await codeFlowAndFriends(app, method);
      const code = new URL(flow.callback).searchParams.get('code');
      assert.ok(!code.startsWith(IAM_PREFIX));
      assert.ok(!tokens.refresh_token.startsWith(IAM_PREFIX));

      assertServed('Rails', await railsRecords(), [...RAILS_AUTHORIZE_STEPS, ...TOKEN_STEPS], app.client_id);
      assertNothingServed('IAM', env.iam.records);
    });
  }

  it('device authorization reaches Rails, where Debian\'s Doorkeeper has no device grant', T, async () => {
    // Doorkeeper's device grant is a separate gem Debian does not package (README), so the
    // Rails side has no device flow to complete; what can be shown is that the request is
    // routed to Rails and Rails' own answer comes back, untouched.
    await clearRecords();
    const app = env.apps.rails;
    const response = await fetch(new URL('/oauth/authorize_device', env.gateway.origin), {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ client_id: app.client_id, scope: 'api' }),
    });
    assert.equal(response.status, 404, 'Rails has no such route');
    assertServed('Rails', await railsRecords(), [
      { method: 'POST', path: '/oauth/authorize_device', status: 404 },
    ], app.client_id, { exact: true });
    assertNothingServed('IAM', env.iam.records);
  });
});

describe('paths Rails routes to the token endpoint (issue 20: classification agrees with Rails)', () => {
  // Rails' router squeezes slashes, drops a trailing one and takes a `.format`: each of these
  // is Doorkeeper's token endpoint, so the gateway must treat it as one (read the body, send
  // each token back to its issuer) while forwarding the path as it came.
  const VARIANTS = ['/oauth/token/', '//oauth/token', '/oauth//token', '/oauth/token.json', '/oauth/token.json/'];

  it('a Rails refresh token and a client-credentials grant reach Doorkeeper\'s token endpoint at each', T, async () => {
    await clearRecords();
    const app = env.apps.rails;
    const { tokens } = await codeFlow(clientConfig(env, app, 'client_secret_basic'), {
      browser: new Browser({ username: 'variantsUser' }),
    });
    const before = await env.gateway.metrics();
    await clearRecords();
    const basic = `Basic ${Buffer.from(`${app.client_id}:${app.client_secret}`).toString('base64')}`;
    const grant = async (path, form) => {
      // Joined to the origin as text: a full URL keeps `//` in its path, where resolving
      // `//oauth/token` against the origin would read `oauth` as a host.
      const response = await fetch(`${env.gateway.origin}${path}`, {
        method: 'POST',
        headers: { authorization: basic, 'content-type': 'application/x-www-form-urlencoded' },
        body: new URLSearchParams(form),
      });
      const body = await response.json();
      assert.equal(response.status, 200, `${path}: ${JSON.stringify(body)}`);
      assert.ok(body.access_token && !body.access_token.startsWith(IAM_PREFIX), `${path}: a Doorkeeper token`);
      return body;
    };
    let refreshToken = tokens.refresh_token;
    assert.ok(!refreshToken.startsWith(IAM_PREFIX), 'issued by Rails');
    for (const path of VARIANTS) {
      const refreshed = await grant(path, { grant_type: 'refresh_token', refresh_token: refreshToken });
      refreshToken = refreshed.refresh_token ?? refreshToken;
      await grant(path, { grant_type: 'client_credentials', scope: 'api' });
    }

    const rails = await railsRecords();
    assertServed('Rails', rails, VARIANTS.flatMap((path) => [
      { method: 'POST', path, grant_type: 'refresh_token', status: 200 },
      { method: 'POST', path, grant_type: 'client_credentials', status: 200 },
    ]), app.client_id, { exact: true });
    for (const r of rails) assert.equal(r.route, 'doorkeeper/tokens#create', `Rails routed ${r.path} to ${r.route}`);
    assertNothingServed('IAM', env.iam.records);

    // The gateway saw the token endpoint each time: the refreshes went by the issuer rule
    // (it read the body, as it does on OAuth paths only), every grant counted as route="token".
    const afterwards = await env.gateway.metrics();
    const grew = (name, labels) => metricValue(afterwards, name, labels) - metricValue(before, name, labels);
    assert.equal(grew('iamproxy_routing_decisions_total', { reason: 'rails_issued' }), VARIANTS.length);
    assert.equal(grew('iamproxy_requests_total', { route: 'token' }), VARIANTS.length * 2);
  });
});

describe('mid-flow flip (DESIGN §3 continuity)', () => {
  it('a flow begun at IAM finishes at IAM after the application is switched to Rails', T, async () => {
    await clearRecords();
    const app = env.apps.flip;
    const config = clientConfig(env, app, 'client_secret_basic');
    const browser = new Browser();

    // 1. The authorization request reaches IAM, which sends the browser to its login page.
    const flow = await beginCodeFlow(config);
    const first = await browser.request('GET', flow.url.href);
    assert.equal(first.status, 303);
    assertServed('IAM', iamRecords(), [IAM_AUTHORIZE_STEPS[0]], app.client_id);

    // 2. The application is switched to Rails, and the gateway's cached decision dropped.
    env.preauthorize.set(app.client_id, 'rails');
    assert.deepEqual(await env.gateway.invalidate(app.client_id), { client_id: app.client_id, invalidated: true, published: null, shared: null });
    //    A new flow for it now starts at Rails: the switch is in force.
    const probe = await beginCodeFlow(config);
    const probed = await new Browser().request('GET', probe.url.href);
    assert.ok(probed.status < 400);
    assertServed('Rails', await railsRecords(), [{ method: 'GET', path: '/oauth/authorize' }], app.client_id);
    assert.equal((await env.gateway.decision(app.client_id)).cached?.destination, 'rails');
    await env.rails.clearRecords();

    // 3. The begun flow goes on: login and consent verifiers, the IAM-issued code and refresh
    //    token all still reach IAM.
    const callback = await browser.run(first.location, { redirectUri: flow.url.searchParams.get('redirect_uri') });
    assert.ok(new URL(callback).searchParams.get('code').startsWith(IAM_PREFIX));
    const tokens = await exchange(config, flow, callback);
    assert.ok(tokens.refresh_token.startsWith(IAM_PREFIX));
    const refreshed = await refresh(config, tokens.refresh_token);
    assert.ok(refreshed.access_token.startsWith(IAM_PREFIX));
    const active = await introspect(config, refreshed.access_token);
    assert.equal(active.active, true);
    await revoke(config, refreshed.refresh_token ?? tokens.refresh_token);

    assertServed('IAM', iamRecords(), [...IAM_AUTHORIZE_STEPS, ...TOKEN_STEPS.slice(0, 4)], app.client_id, { exact: true });
    assertNothingServed('Rails', await railsRecords());

    // 4. Anything not carrying an IAM value goes to Rails now: a whole new flow is Rails'.
    await clearRecords();
    const fresh = await codeFlow(config);
    assert.ok(!fresh.tokens.refresh_token.startsWith(IAM_PREFIX));
    assertServed('Rails', await railsRecords(), [...RAILS_AUTHORIZE_STEPS, TOKEN_STEPS[0]], app.client_id);
    assertNothingServed('IAM', env.iam.records);
  });
});

describe('an application moved from Rails to IAM and back (DESIGN §3 issuer routing)', () => {
  it("what Rails issued before the move keeps working at Rails; a flow IAM started finishes at IAM after the move back", T, async () => {
    await clearRecords();
    const app = env.apps.move;
    const basic = clientConfig(env, app, 'client_secret_basic');
    const post = clientConfig(env, app, 'client_secret_post');
    const railsIssued = (text) => metricValue(text, 'iamproxy_routing_decisions_total', { reason: 'rails_issued' });

    // 1. Routed to Rails: two users hold Doorkeeper tokens, a third has just authorized and
    //    holds a code it has not redeemed yet.
    const alice = await codeFlow(basic, { browser: new Browser({ username: 'moveAlice' }) });
    const bob = await codeFlow(post, { browser: new Browser({ username: 'moveBob' }) });
    const carol = await beginCodeFlow(basic);
    const carolCallback = await new Browser({ username: 'moveCarol' }).run(carol.url.href, { redirectUri: REDIRECT_URI });
    for (const value of [alice.tokens.refresh_token, bob.tokens.access_token, new URL(carolCallback).searchParams.get('code')]) {
      assert.ok(!value.startsWith(IAM_PREFIX), 'issued by Rails');
    }
    assertNothingServed('IAM', env.iam.records);

    // 2. The application moves to IAM: a new authorization request now reaches IAM.
    env.preauthorize.set(app.client_id, 'iam');
    await env.gateway.invalidate(app.client_id);
    await clearRecords();
    const iamFlow = await beginCodeFlow(basic);
    const browser = new Browser(); // one of IAM's users
    const first = await browser.request('GET', iamFlow.url.href);
    assert.equal(first.status, 303, 'IAM sends the browser to its login page');
    assertServed('IAM', iamRecords(), [IAM_AUTHORIZE_STEPS[0]], app.client_id, { exact: true });

    // 3. Everything Rails issued before the move still works, at Rails.
    const metricsBefore = await env.gateway.metrics();
    const carolTokens = await exchange(basic, carol, carolCallback);
    assert.ok(carolTokens.access_token, 'the code from before the move is redeemed');
    const refreshed = await refresh(basic, alice.tokens.refresh_token);
    assert.ok(refreshed.access_token && !refreshed.access_token.startsWith(IAM_PREFIX), 'Rails refreshed it');
    const active = await introspect(post, bob.tokens.access_token);
    assert.equal(active.active, true, `a Rails token introspected after the move: ${JSON.stringify(active)}`);
    assert.deepEqual(await env.rails.token(bob.tokens.refresh_token), { found: true, revoked: false, application: app.client_id });
    await revoke(post, bob.tokens.refresh_token);
    assert.deepEqual(await env.rails.token(bob.tokens.refresh_token), { found: true, revoked: true, application: app.client_id },
      "the revocation took effect in Doorkeeper's records");
    const revoked = await introspect(post, bob.tokens.access_token);
    assert.equal(revoked.active, false, 'Rails reports the revoked token inactive');

    assertServed('Rails', await railsRecords(), [
      { method: 'POST', path: '/oauth/token', grant_type: 'authorization_code' },
      { method: 'POST', path: '/oauth/token', grant_type: 'refresh_token' },
      { method: 'POST', path: '/oauth/introspect' },
      { method: 'POST', path: '/oauth/revoke' },
      { method: 'POST', path: '/oauth/introspect' },
    ], app.client_id, { exact: true });
    assertServed('IAM', iamRecords(), [IAM_AUTHORIZE_STEPS[0]], app.client_id, { exact: true });
    assert.equal(railsIssued(await env.gateway.metrics()) - railsIssued(metricsBefore), 5, 'each routed by the issuer rule');

    // 4. The application moves back to Rails while Dave is at IAM's login page: his flow
    //    finishes at IAM, and Rails' tokens stay Rails'.
    env.preauthorize.set(app.client_id, 'rails');
    await env.gateway.invalidate(app.client_id);
    await clearRecords();
    const callback = await browser.run(first.location, { redirectUri: iamFlow.url.searchParams.get('redirect_uri') });
    const dave = await exchange(basic, iamFlow, callback);
    assert.ok(dave.refresh_token.startsWith(IAM_PREFIX));
    const daveRefreshed = await refresh(basic, dave.refresh_token);
    assert.equal((await introspect(basic, daveRefreshed.access_token)).active, true);
    await revoke(basic, daveRefreshed.refresh_token ?? dave.refresh_token);
    assertServed('IAM', iamRecords(), [...IAM_AUTHORIZE_STEPS.slice(1), ...TOKEN_STEPS.slice(0, 4)], app.client_id, { exact: true });

    const again = await refresh(post, carolTokens.refresh_token);
    assert.ok(again.access_token && !again.access_token.startsWith(IAM_PREFIX));
    assertServed('Rails', await railsRecords(), [
      { method: 'POST', path: '/oauth/token', grant_type: 'refresh_token' },
    ], app.client_id, { exact: true });
  });
});

describe('tracing (issue 18): one trace from the client through the gateway to IAM', () => {
  // The OTLP/HTTP receiver (the repository's otlp_receiver, decoding with opentelemetry-proto)
  // takes the spans of a second gateway, started with `[tracing]`, and of IAM, instrumented
  // with the Node OpenTelemetry SDK for this describe only. The main gateway stays untraced.
  let receiver;
  let gateway;
  const SERVER = 'SPAN_KIND_SERVER';
  const CLIENT = 'SPAN_KIND_CLIENT';
  const SPAN_WAIT = { timeoutMs: 10_000 };

  before(async () => {
    receiver = await startReceiver({ dir: env.dir });
    await env.iam.traceTo(receiver.endpoint);
  });

  after(async () => {
    await gateway?.stop();
    await env.iam.traceTo(null);
    await receiver?.stop();
  });

  it('IAM exports its server span, a child of the traceparent it was sent (Node SDK to the receiver)', T, async () => {
    const client = randomTraceparent();
    for (const headers of [{ traceparent: client.header, tracestate: 'e2e=1' }, {}]) {
      const res = await fetch(`${env.iam.origin}/oauth/discovery/keys`, { headers });
      assert.equal(res.status, 200);
      await res.arrayBuffer();
    }
    await env.iam.flushTraces();
    const jwks = (s) => s.service_name === IAM_SERVICE_NAME && s.name === 'GET /oauth/discovery/keys';
    const [child, root] = await receiver.waitFor('IAM\'s two server spans', (spans) => {
      const child = spans.find((s) => jwks(s) && s.trace_id === client.traceId);
      const root = spans.find((s) => jwks(s) && s.parent_span_id === '');
      return child && root && [child, root];
    }, SPAN_WAIT);

    assert.equal(child.kind, SERVER);
    assert.equal(child.parent_span_id, client.spanId, 'the traceparent\'s span is the parent');
    assert.equal(child.trace_state, 'e2e=1', 'tracestate kept');
    assert.deepEqual(child.attributes, {
      'http.request.method': 'GET',
      'url.path': '/oauth/discovery/keys',
      'http.response.status_code': '200',
    });
    assert.equal(child.status.code, 'STATUS_CODE_UNSET');
    // Without a traceparent: a trace of its own.
    assert.notEqual(root.trace_id, client.traceId);
    assert.match(root.trace_id, /^[0-9a-f]{32}$/);
  });

  it('authorization request for an IAM-routed application: the gateway\'s server, pre-authorize and iam spans, and IAM\'s server span under the iam span', T, async () => {
    gateway = await env.startOtherGateway({ name: 'iamproxy-tracing', tracing: { endpoint: receiver.endpoint } });
    await clearRecords();
    const app = env.apps.iam;
    const config = clientConfig(env, app, 'client_secret_basic');
    // The authorization request, sent to the tracing gateway: IAM answers with its login page.
    const authorize = async (headers = {}) => {
      const { url } = await beginCodeFlow(config);
      const res = await fetch(new URL(url.pathname + url.search, gateway.origin), { headers, redirect: 'manual' });
      await res.arrayBuffer();
      assert.equal(res.status, 303, 'IAM sends the browser to its login page');
      assert.ok(res.headers.get('location').startsWith(`${env.iam.origin}/interaction/`));
    };

    // In one trace: the gateway's SERVER span `GET authorize`, its CLIENT span of the call
    // to IAM (`GET iam`, `iamproxy.upstream` = `iam`), and IAM's SERVER span whose parent is
    // that span (the gateway sent its id in `traceparent`).
    const clientSpan = (spans, server, upstream) => spans.find((s) => s.kind === CLIENT
      && s.attributes['iamproxy.upstream'] === upstream && isChildOf(s, server));
    const chain = (spans, traceId) => {
      const gatewaySpans = spans.filter((s) => s.service_name === 'iamproxy');
      for (const server of gatewaySpans.filter((s) => s.kind === SERVER && s.name === 'GET authorize')) {
        if (traceId && server.trace_id !== traceId) continue;
        const iam = clientSpan(gatewaySpans, server, 'iam');
        const upstream = iam && spans.find((s) => s.service_name === IAM_SERVICE_NAME && isChildOf(s, iam));
        if (upstream) {
          const preauthorize = clientSpan(gatewaySpans, server, 'preauthorize');
          return { server, iam, upstream, preauthorize };
        }
      }
      return null;
    };
    const assertChain = ({ server, iam, upstream }) => {
      const all = formatSpans([server, iam, upstream]);
      assert.equal(iam.name, 'GET iam', all);
      assert.equal(upstream.kind, SERVER, all);
      assert.equal(upstream.name, 'GET /oauth/authorize', all);
      assert.equal(upstream.attributes['http.response.status_code'], '303', all);
    };

    // 1. No trace context from the client: the gateway's server span is a root. The decision
    //    is not cached yet, so the pre-authorize call is a span of the trace too.
    await authorize();
    assertServed('IAM', iamRecords(), [IAM_AUTHORIZE_STEPS[0]], app.client_id, { exact: true });
    assert.equal(iamRecords()[0].forwarded_host, new URL(gateway.origin).host, 'through the tracing gateway');
    await env.iam.flushTraces();
    const first = await receiver.waitFor('one trace: the gateway\'s server span, its preauthorize and iam client spans, IAM\'s server span under the iam span', (spans) => {
      const found = chain(spans);
      return found?.preauthorize && found;
    }, SPAN_WAIT);
    assertChain(first);
    assert.equal(first.server.parent_span_id, '', 'a root span: the client sent no traceparent');
    assert.equal(first.preauthorize.name, 'POST preauthorize');

    // 2. The client's trace context is kept: the gateway's server span is a child of the
    //    client's span, in the client's trace, and IAM's span still under the iam span.
    await clearRecords();
    const client = randomTraceparent();
    await authorize({ traceparent: client.header, tracestate: 'e2e=1' });
    assertServed('IAM', iamRecords(), [IAM_AUTHORIZE_STEPS[0]], app.client_id, { exact: true });
    await env.iam.flushTraces();
    const second = await receiver.waitFor(`the client's trace ${client.traceId} through the gateway to IAM`, (spans) => chain(spans, client.traceId), SPAN_WAIT);
    assertChain(second);
    assert.equal(second.server.parent_span_id, client.spanId, 'the client\'s span is the parent');
    assert.equal(second.upstream.trace_state, 'e2e=1', 'tracestate sent on to IAM');
  });
});

// Last: IAM stays down for the rest of the run.
describe('IAM outage (DESIGN §6 fallback)', () => {
  it('with IAM stopped, new flows of IAM-routed applications complete on Rails, no client call failing', T, async () => {
    await env.iam.stop();
    await assert.rejects(fetch(`${env.iam.origin}/oauth/token`), 'IAM refuses connections');
    await clearRecords();
    const before = await env.gateway.metrics();

    for (const [app, method] of [[env.apps.outage, 'client_secret_basic'], [env.apps.iam, 'client_secret_post']]) {
      await env.rails.clearRecords();
      env.preauthorize.clearCalls();
      assert.equal(env.preauthorize.get(app.client_id), 'iam');
      const { flow, tokens } = await codeFlowAndFriends(app, method);
      assert.ok(!new URL(flow.callback).searchParams.get('code').startsWith(IAM_PREFIX), 'a Rails code');
      assert.ok(!tokens.refresh_token.startsWith(IAM_PREFIX), 'a Rails refresh token');
      assertServed('Rails', await railsRecords(), [...RAILS_AUTHORIZE_STEPS, ...TOKEN_STEPS], app.client_id);
      // Routed to IAM all along: the gateway's decision for it is IAM, and Rails served it.
      for (const c of env.preauthorize.calls) assert.equal(c.destination, 'iam');
      assert.equal((await env.gateway.decision(app.client_id)).cached?.destination, 'iam');
    }
    assert.deepEqual(env.iam.records, [], 'IAM was down');

    const afterwards = await env.gateway.metrics();
    const fallbacks = (text) => metricValue(text, 'iamproxy_fallbacks_total');
    assert.ok(fallbacks(afterwards) > fallbacks(before), 'the gateway fell back to Rails');
    assert.ok(metricValue(afterwards, 'iamproxy_fallbacks_total', { reason: 'connect_error' }) > 0);
  });
});
