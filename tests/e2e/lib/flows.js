// The client side: openid-client (v6) aimed at the gateway, plus the scripted browser, and the
// checks on the servers' own records.
import assert from 'node:assert/strict';

import * as oc from 'openid-client';

import { Browser } from './browser.js';
import { sleep } from './gateway.js';
import { REDIRECT_URI, SCOPES } from './env.js';

export const DEVICE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';

/**
 * One openid-client Configuration per application and client authentication method. The
 * client sees one authorization server at the gateway's address (as it sees
 * gitlab.example.com): metadata written by hand, because /.well-known/* is not an OAuth path
 * and so is Rails' (Doorkeeper without OpenID Connect serves no discovery document).
 */
export function clientConfig(env, app, method) {
  const gw = env.gateway.origin;
  const server = {
    issuer: gw,
    authorization_endpoint: `${gw}/oauth/authorize`,
    token_endpoint: `${gw}/oauth/token`,
    revocation_endpoint: `${gw}/oauth/revoke`,
    introspection_endpoint: `${gw}/oauth/introspect`,
    device_authorization_endpoint: `${gw}/oauth/authorize_device`,
    code_challenge_methods_supported: ['S256'],
  };
  const auth = method === 'client_secret_post'
    ? oc.ClientSecretPost(app.client_secret)
    : oc.ClientSecretBasic(app.client_secret);
  const config = new oc.Configuration(server, app.client_id, { client_secret: app.client_secret }, auth);
  oc.allowInsecureRequests(config);
  return config;
}

/** Authorization request URL with PKCE (S256) and state, and what the exchange needs. */
export async function beginCodeFlow(config) {
  const codeVerifier = oc.randomPKCECodeVerifier();
  const state = oc.randomState();
  const url = oc.buildAuthorizationUrl(config, {
    redirect_uri: REDIRECT_URI,
    scope: SCOPES,
    code_challenge: await oc.calculatePKCECodeChallenge(codeVerifier),
    code_challenge_method: 'S256',
    state,
  });
  return { url, codeVerifier, state };
}

/** Browser part (login + consent) then the code exchange. */
export async function codeFlow(config, { browser = new Browser() } = {}) {
  const flow = await beginCodeFlow(config);
  const callback = await browser.run(flow.url.href, { redirectUri: REDIRECT_URI });
  const tokens = await exchange(config, flow, callback);
  return { ...flow, callback, tokens, browser };
}

export async function exchange(config, flow, callback) {
  return oc.authorizationCodeGrant(config, new URL(callback), {
    pkceCodeVerifier: flow.codeVerifier,
    expectedState: flow.state,
  });
}

export const refresh = (config, refreshToken) => oc.refreshTokenGrant(config, refreshToken);
export const introspect = (config, token) => oc.tokenIntrospection(config, token);
export const revoke = (config, token) => oc.tokenRevocation(config, token);

/**
 * Device authorization with polling. `approve(response)` plays the user on the verification
 * page; it is called after the first poll was answered authorization_pending (seen in
 * `records()`), so the suite sees the client poll, wait and succeed.
 */
export async function deviceFlow(config, { approve, pollsSeen }) {
  const response = await oc.initiateDeviceAuthorization(config, { scope: SCOPES });
  const polling = oc.pollDeviceAuthorizationGrant(config, response);
  polling.catch(() => {}); // awaited below; keep an early rejection from going unhandled
  const deadline = Date.now() + 20_000;
  while ((await pollsSeen()) < 1) {
    if (Date.now() > deadline) throw new Error('the client did not poll within 20s');
    await sleep(100);
  }
  await approve(response);
  const tokens = await polling;
  return { response, tokens };
}

// --- records ---------------------------------------------------------------------------

/** The /oauth/* entries of a server's records (repeated slashes squeezed, as Rails' router does). */
export const oauthOnly = (records) => records.filter((r) => r.path.replace(/\/+/g, '/').startsWith('/oauth/'));

/**
 * Asserts that `records` (one server's own) contain `steps` in this order (with `exact`:
 * nothing else), each served successfully (status < 400 unless the step says otherwise),
 * and that every request the server saw a client for was `clientId`'s.
 * A step: { method, path, grant_type?, verifier?, status? }.
 */
export function assertServed(server, records, steps, clientId, { exact = false } = {}) {
  if (exact) {
    assert.equal(records.length, steps.length, `${server} served other requests too:\n${fmt(records)}`);
  }
  for (const r of records) {
    if (r.client_id !== null && r.client_id !== undefined) {
      assert.equal(r.client_id, clientId, `${server} served a request of another client\n${fmt(records)}`);
    }
    // Rails' records say whether Doorkeeper authenticated the client; IAM's which method.
    assert.notEqual(r.client_authenticated, false, `${server} refused the client's credentials\n${fmt(records)}`);
  }
  let i = 0;
  for (const step of steps) {
    const at = records.findIndex((r, k) => k >= i
      && r.method === step.method
      && r.path === step.path
      && (step.grant_type === undefined || r.grant_type === step.grant_type)
      && (step.verifier === undefined || r.verifier === step.verifier));
    assert.ok(at >= 0, `${server} did not serve ${JSON.stringify(step)} (after entry ${i}); its records:\n${fmt(records)}`);
    const r = records[at];
    if (step.status !== undefined) {
      assert.equal(r.status, step.status, `${server}: ${JSON.stringify(step)} status\n${fmt(records)}`);
    } else {
      assert.ok(r.status > 0 && r.status < 400, `${server}: ${JSON.stringify(step)} answered ${r.status}\n${fmt(records)}`);
    }
    if (exact) assert.equal(at, i, `${server}: ${JSON.stringify(step)} was not next\n${fmt(records)}`);
    i = at + 1;
  }
}

export function assertNothingServed(server, records) {
  assert.deepEqual(oauthOnly(records), [], `${server} served /oauth requests it should not have:\n${fmt(records)}`);
}

function fmt(records) {
  return records.map((r) => JSON.stringify(r)).join('\n');
}
