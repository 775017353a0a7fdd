// The pre-authorize backend (DESIGN §4): POST /-/oauth/iam_routing?client_id=...
// It verifies the Gitlab-Workhorse-Api-Request JWT (HS256, iss gitlab-workhorse, signed with
// the 32 bytes whose base64 is in the secret file) with node's crypto, answers 401 otherwise,
// and answers {"destination": ...} from a table the test changes. Every call is recorded.
import { createHmac, timingSafeEqual } from 'node:crypto';
import http from 'node:http';

const CONTENT_TYPE = 'application/vnd.gitlab-workhorse+json';
const MAX_CLOCK_SKEW_S = 60;

/**
 * @param {object} options
 * @param {Buffer} options.secret the 32 raw bytes (decoded from the secret file)
 * @param {Record<string, 'iam'|'rails'>} options.table initial routing table; unknown ids: rails
 */
export async function startPreauthorize({ secret, table = {} }) {
  if (secret.length !== 32) throw new Error('the Workhorse secret must be 32 bytes');
  const routes = new Map(Object.entries(table));
  const calls = [];

  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://preauthorize');
    const call = {
      method: req.method,
      path: url.pathname,
      client_id: url.searchParams.get('client_id'),
      request_id: req.headers['x-request-id'] ?? null,
      workhorse: req.headers['gitlab-workhorse'] ?? null,
      forwarded_cookie: 'cookie' in req.headers,
      forwarded_authorization: 'authorization' in req.headers,
      jwt: null,
      status: 0,
      destination: null,
    };
    calls.push(call);
    req.resume();
    const answer = (status, body, headers = {}) => {
      call.status = status;
      res.writeHead(status, { 'content-type': CONTENT_TYPE, ...headers });
      res.end(JSON.stringify(body));
    };

    if (req.method !== 'POST' || url.pathname !== '/-/oauth/iam_routing') {
      answer(404, { message: 'not found' });
      return;
    }
    call.jwt = verifyJwt(req.headers['gitlab-workhorse-api-request'], secret);
    if (call.jwt !== 'ok') {
      answer(401, { message: '401 Unauthorized' });
      return;
    }
    if (!call.client_id) {
      answer(400, { message: 'client_id missing' });
      return;
    }
    call.destination = routes.get(call.client_id) ?? 'rails';
    answer(200, { destination: call.destination });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();

  return {
    url: `http://127.0.0.1:${port}/-/oauth/iam_routing`,
    calls,
    set(clientId, destination) { routes.set(clientId, destination); },
    get(clientId) { return routes.get(clientId) ?? 'rails'; },
    clearCalls() { calls.length = 0; },
    async stop() {
      const closed = new Promise((resolve) => server.close(resolve));
      server.closeAllConnections();
      await closed;
    },
  };
}

/** 'ok', or why the token is refused. */
export function verifyJwt(token, secret, now = Date.now() / 1000) {
  if (typeof token !== 'string') return 'missing';
  const parts = token.split('.');
  if (parts.length !== 3) return 'malformed';
  const [h, p, s] = parts;
  let header;
  let claims;
  try {
    header = JSON.parse(Buffer.from(h, 'base64url').toString('utf8'));
    claims = JSON.parse(Buffer.from(p, 'base64url').toString('utf8'));
  } catch {
    return 'malformed';
  }
  if (header?.alg !== 'HS256') return 'alg';
  const expected = createHmac('sha256', secret).update(`${h}.${p}`).digest();
  const given = Buffer.from(s, 'base64url');
  if (given.length !== expected.length || !timingSafeEqual(given, expected)) return 'signature';
  if (claims?.iss !== 'gitlab-workhorse') return 'iss';
  if (typeof claims.iat !== 'number' || Math.abs(now - claims.iat) > MAX_CLOCK_SKEW_S) return 'iat';
  return 'ok';
}

/** A token as Workhorse signs it (for checking the backend refuses what it should). */
export function signJwt(claims, secret, alg = 'HS256') {
  const enc = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const input = `${enc({ alg, typ: 'JWT' })}.${enc(claims)}`;
  return `${input}.${createHmac('sha256', secret).update(input).digest('base64url')}`;
}
