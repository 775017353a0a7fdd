// Starts the whole loopback setup for one test run and stops it again:
//   pre-authorize backend ─┐
//   IAM (oidc-provider) ───┼── iamproxy ◄── openid-client + scripted browser
//   Rails (Doorkeeper) ────┘
// Secrets (Workhorse secret, admin token, client secrets) are generated here, per run.
import { randomBytes } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { freePort, startGateway } from './gateway.js';
import { startIam } from './iam.js';
import { startPreauthorize } from './preauthorize.js';
import { installExitHandlers } from './procs.js';
import { startRails } from './rails.js';

// The browser never loads the callback: it stops at the redirect to it.
export const REDIRECT_URI = 'http://127.0.0.1/e2e/callback';
export const SCOPES = 'api read_user';

/**
 * The test applications and where the pre-authorize table first routes each. Ids (and
 * secrets) are alphanumeric: openid-client form-encodes client_secret_basic credentials
 * (RFC 6749 §2.3.1, so `-` becomes `%2D`) and Doorkeeper 5.5 does not decode them.
 */
export const APPS = {
  iam: { client_id: 'e2eIamApp', name: 'E2E app routed to IAM', route: 'iam' },
  rails: { client_id: 'e2eRailsApp', name: 'E2E app routed to Rails', route: 'rails' },
  flip: { client_id: 'e2eFlipApp', name: 'E2E app flipped mid-flow', route: 'iam' },
  outage: { client_id: 'e2eOutageApp', name: 'E2E app routed to IAM during the outage', route: 'iam' },
  move: { client_id: 'e2eMoveApp', name: 'E2E app moved from Rails to IAM and back', route: 'rails' },
};

export async function startEnv() {
  installExitHandlers();
  const dir = process.env.E2E_TMP || mkdtempSync(path.join(os.tmpdir(), 'iamproxy-e2e-'));
  const clients = Object.values(APPS).map((a) => ({
    client_id: a.client_id,
    client_secret: randomBytes(24).toString('hex'), // URL-safe: see rails/README.md
    redirect_uri: REDIRECT_URI,
    name: a.name,
    scopes: SCOPES,
  }));
  const byId = Object.fromEntries(clients.map((c) => [c.client_id, c]));
  const apps = Object.fromEntries(Object.entries(APPS).map(([k, a]) => [k, { ...a, ...byId[a.client_id] }]));

  const secret = randomBytes(32);
  const secretFile = path.join(dir, 'gitlab_workhorse_secret');
  writeFileSync(secretFile, `${secret.toString('base64')}\n`, { mode: 0o600 });

  const env = { dir, apps, clients, secret };
  const stops = [];
  env.stop = async () => {
    for (const stop of stops.reverse()) {
      try { await stop(); } catch (err) { console.error('stop failed:', err); }
    }
  };
  try {
    env.preauthorize = await startPreauthorize({
      secret,
      table: Object.fromEntries(Object.values(APPS).map((a) => [a.client_id, a.route])),
    });
    stops.push(() => env.preauthorize.stop());

    // IAM's issuer is the gateway's URL (IAM serves behind it), so the port comes first.
    const gatewayPort = await freePort();
    env.iam = await startIam({ issuer: `http://127.0.0.1:${gatewayPort}`, clients });
    stops.push(() => env.iam.stop());

    env.rails = await startRails({ dir, clients });
    stops.push(() => env.rails.stop());

    const upstreams = {
      dir,
      railsUrl: env.rails.origin,
      iamUrl: env.iam.origin,
      preauthorizeUrl: env.preauthorize.url,
      secretFile,
    };
    env.gateway = await startGateway({
      ...upstreams,
      port: gatewayPort,
      adminToken: randomBytes(24).toString('base64url'),
    });
    stops.push(() => env.gateway.stop());

    /**
     * A second gateway in front of the same servers, on its own ports and files (`name`),
     * with other options (e.g. `tracing`); stopped with the rest unless stopped before.
     * IAM's issuer stays the first gateway's URL.
     */
    env.startOtherGateway = async ({ name, ...options }) => {
      const gateway = await startGateway({
        ...upstreams,
        port: await freePort(),
        adminToken: randomBytes(24).toString('base64url'),
        name,
        ...options,
      });
      stops.push(() => gateway.stop());
      return gateway;
    };
  } catch (err) {
    await env.stop();
    throw err;
  }
  return env;
}
