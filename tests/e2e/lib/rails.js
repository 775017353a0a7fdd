// The Rails side: tests/e2e/rails (a minimal Rails app with Doorkeeper), started through its
// contract: `bash tests/e2e/rails/start.sh` with RAILS_E2E_PORT and RAILS_E2E_CLIENTS, ready
// when GET /-/health answers 200, records at GET/DELETE /test/records.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createWriteStream, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { freePort, sleep } from './gateway.js';
import { track, untrack } from './procs.js';

const RAILS_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../rails');

export async function startRails({ dir, clients, readyTimeoutMs = 180_000 }) {
  const port = await freePort();
  const clientsFile = path.join(dir, 'rails_clients.json');
  writeFileSync(clientsFile, JSON.stringify(clients, null, 2), { mode: 0o600 });
  const logFile = path.join(dir, 'rails.log');
  const log = createWriteStream(logFile);
  // Its own process group, so stopping it stops whatever start.sh started.
  const start = process.env.E2E_RAILS_START || path.join(RAILS_DIR, 'start.sh');
  const child = spawn('bash', [start], {
    env: { ...process.env, RAILS_E2E_PORT: String(port), RAILS_E2E_CLIENTS: clientsFile },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  child.stdout.pipe(log);
  child.stderr.pipe(log);
  track('rails', child.pid, true);
  const exited = once(child, 'exit');

  const origin = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + readyTimeoutMs;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`rails start.sh exited with ${child.exitCode}; see ${logFile}`);
    try {
      const res = await fetch(`${origin}/-/health`);
      if (res.status === 200) break;
    } catch { /* not up yet */ }
    if (Date.now() > deadline) {
      throw new Error(`rails not healthy within ${readyTimeoutMs / 1000}s; see ${logFile}`);
    }
    await sleep(250);
  }

  return {
    origin,
    port,
    logFile,
    async records() {
      const res = await fetch(`${origin}/test/records`);
      if (res.status !== 200) throw new Error(`GET /test/records answered ${res.status}`);
      return res.json();
    },
    /** Doorkeeper's record of an access or refresh token: { found, revoked, application }. */
    async token(value) {
      const res = await fetch(`${origin}/test/token?token=${encodeURIComponent(value)}`);
      if (res.status !== 200) throw new Error(`GET /test/token answered ${res.status}`);
      return res.json();
    },
    async clearRecords() {
      const res = await fetch(`${origin}/test/records`, { method: 'DELETE' });
      if (res.status >= 300) throw new Error(`DELETE /test/records answered ${res.status}`);
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        try { process.kill(-child.pid, 'SIGTERM'); } catch { /* gone */ }
        const timer = setTimeout(() => {
          try { process.kill(-child.pid, 'SIGKILL'); } catch { /* gone */ }
        }, 10_000);
        await exited;
        clearTimeout(timer);
      }
      // start.sh may have left children in the group after its own exit.
      try { process.kill(-child.pid, 'SIGKILL'); } catch { /* gone */ }
      untrack(child.pid);
      log.end();
    },
  };
}
