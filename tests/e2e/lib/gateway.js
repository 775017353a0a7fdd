// The gateway under test: iamproxy's binary, configured with a TOML file written at test time.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createWriteStream, existsSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { track, untrack } from './procs.js';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

export function gatewayBinary() {
  const bin = process.env.IAMPROXY_BIN || path.join(REPO_ROOT, 'target/debug/iamproxy');
  if (!existsSync(bin)) {
    throw new Error(`no gateway binary at ${bin}: build it (cargo build --locked --bin iamproxy) or set IAMPROXY_BIN`);
  }
  return bin;
}

/** A port nothing listens on now (bound and released; the gateway binds it right after). */
export async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/**
 * @param {object} o
 * @param {string} o.dir where the config, secret, token and log files go
 * @param {number} o.port the main listener's port (IAM's issuer names it, so it is chosen first)
 * @param {string} o.railsUrl
 * @param {string} o.iamUrl
 * @param {string} o.preauthorizeUrl
 * @param {string} o.secretFile base64 of the 32-byte Workhorse secret
 * @param {string} o.adminToken
 * @param {string} [o.name] names its files (`<name>.toml`, `<name>.log`, `<name>_admin_token`)
 *   and its process, so a second gateway can run beside the first
 * @param {{endpoint: string, serviceName?: string, sampleRatio?: number, trustIncoming?: boolean}} [o.tracing]
 *   adds a `[tracing]` table exporting every request's spans to this OTLP/HTTP endpoint
 *   (`http://127.0.0.1:PORT/v1/traces`); off by default
 */
export async function startGateway({
  dir, port, railsUrl, iamUrl, preauthorizeUrl, secretFile, adminToken, name = 'iamproxy', tracing,
}) {
  const adminPort = await freePort();
  const tokenFile = path.join(dir, name === 'iamproxy' ? 'admin_token' : `${name}_admin_token`);
  writeFileSync(tokenFile, `${adminToken}\n`, { mode: 0o600 });
  const configFile = path.join(dir, `${name}.toml`);
  writeFileSync(configFile, `# written by tests/e2e at test time
[server]
listen = "127.0.0.1:${port}"
admin_listen = "127.0.0.1:${adminPort}"
header_read_timeout = "10s"
body_read_timeout = "10s"
shutdown_timeout = "2s"

[rails]
url = "${railsUrl}"
connect_timeout = "2s"
timeout = "30s"

[iam]
url = "${iamUrl}"
connect_timeout = "500ms"
timeout = "5s"

[iam.circuit_breaker]
consecutive_failures = 5
open_for = "10s"

[preauthorize]
url = "${preauthorizeUrl}"
secret_file = "${secretFile}"
timeout = "2s"

[cache]
ttl = "60s"

[admin]
token_file = "${tokenFile}"

[log]
format = "json"
level = "info"
${tracing ? tracingTable(tracing) : ''}`);

  const bin = gatewayBinary();
  const logFile = path.join(dir, `${name}.log`);
  const log = createWriteStream(logFile);
  const child = spawn(bin, ['--config', configFile], { stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout.pipe(log);
  child.stderr.pipe(log);
  track(name, child.pid, false);
  const exited = once(child, 'exit');

  const origin = `http://127.0.0.1:${port}`;
  const admin = `http://127.0.0.1:${adminPort}`;
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`${name} exited with ${child.exitCode}; see ${logFile}`);
    try {
      const res = await fetch(`${admin}/-/readiness`);
      if (res.status === 200) break;
    } catch { /* not up yet */ }
    if (Date.now() > deadline) throw new Error(`${name} not ready within 30s; see ${logFile}`);
    await sleep(100);
  }

  const authz = { authorization: `Bearer ${adminToken}` };
  return {
    origin,
    admin,
    configFile,
    logFile,
    pid: child.pid,
    /** DELETE /-/admin/decisions/<client_id>: forget the cached decision. */
    async invalidate(clientId) {
      const res = await fetch(`${admin}/-/admin/decisions/${encodeURIComponent(clientId)}`, { method: 'DELETE', headers: authz });
      if (res.status !== 200) throw new Error(`admin DELETE answered ${res.status}`);
      return res.json();
    },
    async decision(clientId) {
      const res = await fetch(`${admin}/-/admin/decisions/${encodeURIComponent(clientId)}`, { headers: authz });
      if (res.status !== 200) throw new Error(`admin GET answered ${res.status}`);
      return res.json();
    },
    async metrics() {
      return (await fetch(`${admin}/metrics`)).text();
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
        await exited;
        clearTimeout(timer);
      }
      untrack(child.pid);
      log.end();
    },
  };
}

// The `[tracing]` table: spans of every request (sample_ratio 1.0) to the OTLP/HTTP endpoint,
// and the trace context of an incoming `traceparent` kept (trust_incoming).
function tracingTable({ endpoint, serviceName = 'iamproxy', sampleRatio = 1.0, trustIncoming = true }) {
  return `
[tracing]
otlp_endpoint = "${endpoint}"
service_name = "${serviceName}"
sample_ratio = ${Number.isInteger(sampleRatio) ? sampleRatio.toFixed(1) : sampleRatio}
trust_incoming = ${trustIncoming}
`;
}

/** The value of one sample line of the Prometheus text, or 0 when absent. */
export function metricValue(text, name, labels = {}) {
  let total = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    const ok = Object.entries(labels).every(([k, v]) => line.includes(`${k}="${v}"`));
    if (ok) total += Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return total;
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
