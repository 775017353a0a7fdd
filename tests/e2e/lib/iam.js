// The IAM side: a real authorization server (npm oidc-provider) with its endpoints under
// /oauth/... as GitLab's are, an in-memory store, the same test clients as Rails, and a
// scripted login and consent for the test users.
//
// What this server adds around oidc-provider, all in this file:
// - Issued values carry the IAM prefix (`giat_`): the id generators of the AuthorizationCode,
//   RefreshToken, DeviceCode and AccessToken models are wrapped (see prefixIssuedValues).
// - The login and consent pages live at IAM's own address (/interaction/<uid>), like Ory
//   Hydra's login UI. When a page finishes the interaction (oidc-provider's
//   interactionResult), the browser is sent back through the gateway to
//   /oauth/authorize?client_id=...&login_verifier=<uid> (or consent_verifier), as DESIGN §3
//   expects; this server maps that request onto oidc-provider's resume route
//   /oauth/authorize/<uid> (see mapVerifier).
// - Records: one entry per request served, from a koa middleware inside the provider.
// - stop()/start(): close the listener and every open connection, and listen again on the
//   same port.
// - Tracing, only when asked (the `tracing` option or traceTo()): one SERVER span per request,
//   child of the W3C `traceparent` the request carries, exported by the Node OpenTelemetry
//   SDK over OTLP/HTTP (protobuf) as service `iam-oidc-provider` (see serverTracing).
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import http from 'node:http';

import { defaultTextMapGetter, ROOT_CONTEXT, SpanKind, SpanStatusCode } from '@opentelemetry/api';
import { W3CTraceContextPropagator } from '@opentelemetry/core';
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-proto';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { BasicTracerProvider, BatchSpanProcessor } from '@opentelemetry/sdk-trace-base';
import Provider from 'oidc-provider';

export const IAM_PREFIX = 'giat_';
export const IAM_SERVICE_NAME = 'iam-oidc-provider';

const DEVICE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';
const VERIFIERS = { login: 'login_verifier', consent: 'consent_verifier' };

/**
 * @param {object} options
 * @param {string} options.issuer the gateway's origin: IAM runs behind it, as it would behind
 *   gitlab.example.com in production, so its issuer and the URLs it builds are the gateway's.
 * @param {Array<{client_id, client_secret, redirect_uri, name, scopes}>} options.clients
 * @param {string[]} options.users accounts the scripted login accepts
 * @param {{endpoint: string}} [options.tracing] export a span per request to this OTLP/HTTP
 *   endpoint (`http://127.0.0.1:PORT/v1/traces`); off by default (see traceTo)
 */
export async function startIam({ issuer, clients, users = ['alice'], tracing }) {
  const records = [];
  let tracer = tracing ? serverTracing(tracing.endpoint) : null;
  const server = http.createServer();
  const sockets = new Set();
  server.on('connection', (socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  await listen(server, 0);
  const { port } = server.address();
  const origin = `http://127.0.0.1:${port}`;

  const scopes = new Set(['openid', 'offline_access']);
  for (const c of clients) for (const s of c.scopes.split(' ')) scopes.add(s);

  const provider = new Provider(issuer, {
    clients: clients.map((c) => ({
      client_id: c.client_id,
      client_secret: c.client_secret,
      client_name: c.name,
      redirect_uris: [c.redirect_uri],
      response_types: ['code'],
      grant_types: ['authorization_code', 'refresh_token', DEVICE_GRANT],
      // oidc-provider accepts client_secret_basic and client_secret_post alike for a client
      // registered with either (lib/shared/client_auth.js), as Doorkeeper does.
      token_endpoint_auth_method: 'client_secret_basic',
      scope: c.scopes,
    })),
    routes: {
      authorization: '/oauth/authorize',
      token: '/oauth/token',
      revocation: '/oauth/revoke',
      introspection: '/oauth/introspect',
      device_authorization: '/oauth/authorize_device',
      code_verification: '/oauth/device',
      userinfo: '/oauth/userinfo',
      jwks: '/oauth/discovery/keys',
      end_session: '/oauth/logout',
      pushed_authorization_request: '/oauth/par',
    },
    scopes: [...scopes],
    pkce: { required: () => true },
    // Doorkeeper issues a refresh token whenever refresh tokens are on; do the same rather
    // than asking for offline_access, so one scope string fits both servers.
    issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
    features: {
      devInteractions: { enabled: false },
      revocation: { enabled: true },
      // As the Rails app: a client may introspect its own tokens only.
      introspection: {
        enabled: true,
        allowedPolicy: async (_ctx, client, token) => token.clientId === client.clientId,
      },
      // Without resource indicators an access token is opaque, stored, and introspectable.
      resourceIndicators: { enabled: false },
      deviceFlow: {
        enabled: true,
        userCodeInputSource,
        userCodeConfirmSource,
        successSource,
      },
    },
    interactions: {
      url: (_ctx, interaction) => `${origin}/interaction/${interaction.uid}`,
    },
    findAccount: async (_ctx, sub) => (users.includes(sub)
      ? { accountId: sub, claims: async () => ({ sub }) }
      : undefined),
    cookies: { keys: [randomBytes(32).toString('base64url')] },
    jwks: { keys: [signingKey()] },
    ttl: {
      AccessToken: 3600,
      AuthorizationCode: 120,
      DeviceCode: 600,
      Grant: 3600,
      IdToken: 3600,
      Interaction: 600,
      RefreshToken: 86400,
      Session: 3600,
    },
    renderError: async (ctx, out) => {
      ctx.type = 'html';
      ctx.body = `<!DOCTYPE html><title>error</title><pre id="error">${esc(JSON.stringify(out))}</pre>`;
    },
  });
  // Behind the gateway: trust X-Forwarded-Host and X-Forwarded-Proto (DESIGN §5), so the
  // URLs oidc-provider builds (resume, verification_uri) name the gateway.
  provider.proxy = true;
  provider.on('server_error', (_ctx, err) => console.error('iam: server_error', err));
  prefixIssuedValues(provider);

  provider.use(async (ctx, next) => {
    const original = ctx.req.e2e;
    try {
      await next();
    } finally {
      const oidc = ctx.oidc;
      const params = oidc?.params;
      records.push({
        method: ctx.method,
        path: original.path,
        client_id: oidc?.client?.clientId ?? null,
        grant_type: (ctx.method === 'POST' && params?.grant_type) || null,
        status: ctx.status,
        // extras beyond the Rails contract's fields:
        verifier: original.verifier,
        auth: ctx.get('authorization').toLowerCase().startsWith('basic ')
          ? 'client_secret_basic'
          : (params?.client_secret ? 'client_secret_post' : null),
        forwarded_host: ctx.get('x-forwarded-host') || null,
      });
    }
  });

  const providerCallback = provider.callback();
  server.on('request', (req, res) => {
    tracer?.serve(req, res);
    const url = new URL(req.url, origin);
    req.e2e = { path: url.pathname, verifier: null };
    if (url.pathname.startsWith('/interaction/')) {
      interactionPage(provider, req, res, url, records, users).catch((err) => {
        console.error('iam: interaction failed', err);
        if (!res.headersSent) res.writeHead(500, { 'content-type': 'text/plain' });
        res.end(String(err.message));
      });
      return;
    }
    mapVerifier(req, res, url);
    providerCallback(req, res);
  });

  return {
    origin,
    port,
    provider,
    records,
    clearRecords() { records.length = 0; },
    /** Closes the listener and every open connection: the gateway sees connection refused. */
    async stop() {
      const closed = new Promise((resolve) => server.close(resolve));
      for (const s of sockets) s.destroy();
      server.closeAllConnections();
      await closed;
    },
    async start() {
      if (!server.listening) await listen(server, port);
    },
    get listening() { return server.listening; },
    /**
     * Starts tracing every request from now on, exporting to `endpoint`; null stops it
     * (what was recorded is exported first).
     */
    async traceTo(endpoint) {
      const previous = tracer;
      tracer = endpoint ? serverTracing(endpoint) : null;
      await previous?.shutdown();
    },
    /** Exports the spans recorded so far now rather than at the next batch. */
    async flushTraces() {
      await tracer?.flush();
    },
  };
}

// IAM's side of a distributed trace, instrumented by hand with the Node OpenTelemetry SDK:
// the automatic http instrumentation needs a loader hook in an ESM suite, while this is one
// span per request. The request's W3C trace context (`traceparent`, `tracestate`) is
// extracted with the SDK's propagator, and the SERVER span `{METHOD} {path}` starts with it
// as parent: behind the gateway, the parent is the gateway's `iam` client span, so the span
// lands in the gateway's trace. The default sampler follows the parent's sampled flag (a
// request without one is sampled). The span ends when the response is done (or the
// connection closed), with `http.response.status_code`, and status ERROR for a 5xx.
// Spans go out in batches over OTLP/HTTP protobuf, as the gateway's do.
function serverTracing(endpoint) {
  const provider = new BasicTracerProvider({
    resource: resourceFromAttributes({ 'service.name': IAM_SERVICE_NAME }),
    spanProcessors: [
      new BatchSpanProcessor(new OTLPTraceExporter({ url: endpoint, compression: 'none' }), {
        scheduledDelayMillis: 100,
      }),
    ],
  });
  const tracer = provider.getTracer('iamproxy-e2e-iam');
  const propagator = new W3CTraceContextPropagator();
  return {
    serve(req, res) {
      const parent = propagator.extract(ROOT_CONTEXT, req.headers, defaultTextMapGetter);
      const path = new URL(req.url, 'http://iam').pathname; // as the gateway sent it
      const span = tracer.startSpan(`${req.method} ${path}`, {
        kind: SpanKind.SERVER,
        attributes: { 'http.request.method': req.method, 'url.path': path },
      }, parent);
      res.once('close', () => {
        span.setAttribute('http.response.status_code', res.statusCode);
        if (res.statusCode >= 500) span.setStatus({ code: SpanStatusCode.ERROR });
        if (!res.writableFinished) span.setStatus({ code: SpanStatusCode.ERROR, message: 'connection closed before the response was sent' });
        span.end();
      });
    },
    flush: () => provider.forceFlush(),
    shutdown: () => provider.shutdown(),
  };
}

// Every value the server hands out that a client sends back (codes, refresh tokens, device
// codes, access tokens) starts with IAM_PREFIX. oidc-provider has no setting for it, but each
// model generates its id (for opaque values: the value the client sees, also the store key)
// with the instance method generateTokenId(); wrapping it on the four model classes of this
// provider prefixes the value at its source, so lookups, consumption and revocation use the
// prefixed value as they would an unprefixed one.
function prefixIssuedValues(provider) {
  for (const Model of [
    provider.AuthorizationCode,
    provider.RefreshToken,
    provider.DeviceCode,
    provider.AccessToken,
  ]) {
    const generate = Model.prototype.generateTokenId;
    Model.prototype.generateTokenId = function prefixedTokenId(...args) {
      return IAM_PREFIX + generate.apply(this, args);
    };
  }
}

// /oauth/authorize?...&login_verifier=<uid> (or consent_verifier) is the browser coming back
// through the gateway after the login or consent page: serve it as oidc-provider's resume
// route /oauth/authorize/<uid>. The resume cookie oidc-provider set is scoped to that path;
// it is rescoped to /oauth/authorize (rescopeResumeCookie) so the browser sends it here.
function mapVerifier(req, res, url) {
  if (url.pathname === '/oauth/authorize') {
    for (const [kind, param] of Object.entries(VERIFIERS)) {
      const uid = url.searchParams.get(param);
      if (uid) {
        req.e2e.verifier = kind;
        req.url = `/oauth/authorize/${encodeURIComponent(uid)}`;
        break;
      }
    }
  }
  rescopeResumeCookie(res);
}

function rescopeResumeCookie(res) {
  const setHeader = res.setHeader.bind(res);
  res.setHeader = (name, value) => {
    if (name.toLowerCase() === 'set-cookie') {
      const values = (Array.isArray(value) ? value : [value]).map((v) => (
        /^_interaction_resume(\.sig)?=/.test(v)
          ? v.replace(/;\s*path=\/oauth\/authorize\/[^;]*/i, '; path=/oauth/authorize')
          : v));
      return setHeader(name, values);
    }
    return setHeader(name, value);
  };
}

// The scripted login and consent UI (IAM's own pages, at IAM's own address).
async function interactionPage(provider, req, res, url, records, users) {
  const [, , uid, action] = url.pathname.split('/');
  const record = {
    method: req.method,
    path: `/interaction/:uid${action ? `/${action}` : ''}`,
    client_id: null,
    grant_type: null,
    status: 500, // until answered
    verifier: null,
    auth: null,
    forwarded_host: null,
  };
  records.push(record);
  const details = await provider.interactionDetails(req, res);
  record.client_id = details.params.client_id;
  if (details.uid !== uid) throw new Error('interaction cookie does not match the page');
  const { prompt } = details;

  if (req.method === 'GET' && !action) {
    record.status = 200;
    const client = await provider.Client.find(details.params.client_id);
    const body = prompt.name === 'login'
      ? `<h1>Sign in to ${esc(client.clientName)}</h1>
<form id="login" method="post" action="/interaction/${esc(uid)}/login">
<input type="text" name="username"><button type="submit">Sign in</button></form>`
      : `<h1>Authorize ${esc(client.clientName)}</h1>
<p>Scopes: ${esc(details.params.scope ?? '')}</p>
<form id="consent" method="post" action="/interaction/${esc(uid)}/confirm">
<input type="hidden" name="decision" value="approve"><button type="submit">Authorize</button></form>`;
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(`<!DOCTYPE html><html><body>${body}</body></html>`);
    return;
  }
  if (req.method !== 'POST') throw new Error(`unexpected ${req.method} ${url.pathname}`);
  const form = new URLSearchParams(await readBody(req));

  let result;
  if (action === 'login' && prompt.name === 'login') {
    const username = form.get('username');
    if (!users.includes(username)) {
      record.status = 403;
      res.writeHead(403, { 'content-type': 'text/plain' });
      res.end('unknown user');
      return;
    }
    result = { login: { accountId: username } };
  } else if (action === 'confirm' && prompt.name === 'consent') {
    const { session: { accountId }, params, grantId: existing } = details;
    const grant = existing
      ? await provider.Grant.find(existing)
      : new provider.Grant({ accountId, clientId: params.client_id });
    const missing = prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    result = { consent: { grantId: await grant.save() } };
  } else {
    throw new Error(`${action} does not answer the ${prompt.name} prompt`);
  }

  const returnTo = new URL(await provider.interactionResult(req, res, result));
  // Back through the gateway with the verifier, as an IAM behind GitLab would send it
  // (the device flow's resume route is on IAM's own address and stays as it is).
  let location = returnTo.href;
  const resume = returnTo.pathname.match(/^\/oauth\/authorize\/([^/]+)$/);
  if (resume) {
    const back = new URL('/oauth/authorize', returnTo);
    back.searchParams.set('client_id', details.params.client_id);
    back.searchParams.set(VERIFIERS[prompt.name], decodeURIComponent(resume[1]));
    location = back.href;
  }
  record.status = 303;
  res.writeHead(303, { location, 'content-length': '0' });
  res.end();
}

async function userCodeInputSource(ctx, form, _out, err) {
  ctx.body = `<!DOCTYPE html><html><body><h1>Device sign-in</h1>
${err ? `<p id="error">${esc(err.message ?? String(err))}</p>` : ''}
${form}
<input type="text" name="user_code" form="op.deviceInputForm"><button type="submit" form="op.deviceInputForm">Continue</button>
</body></html>`;
}

async function userCodeConfirmSource(ctx, form, client, _deviceInfo, userCode) {
  ctx.body = `<!DOCTYPE html><html><body><h1>Confirm device for ${esc(client.clientName)}</h1>
<p>Code: <code>${esc(userCode)}</code></p>
${form}
<button type="submit" form="op.deviceConfirmForm">Continue</button>
</body></html>`;
}

async function successSource(ctx) {
  ctx.body = '<!DOCTYPE html><html><body><h1 id="device-success">Sign-in Success</h1></body></html>';
}

function signingKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), use: 'sig', alg: 'RS256', kid: 'e2e' };
}

function listen(server, port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
