// Every process the suite starts is tracked here, so it is stopped even when a test fails or
// the test process is interrupted: on exit this process kills what is still tracked, and
// run.sh's trap kills whatever is listed in $E2E_PIDS_FILE (if node itself was killed).
import { writeFileSync } from 'node:fs';

const tracked = new Map(); // pid -> { name, group }

function persist() {
  const file = process.env.E2E_PIDS_FILE;
  if (!file) return;
  writeFileSync(file, [...tracked].map(([pid, { group, name }]) => `${group ? -pid : pid} ${name}\n`).join(''));
}

/** group: the process leads its own process group (spawned detached): kill the group. */
export function track(name, pid, group) {
  tracked.set(pid, { name, group });
  persist();
}

export function untrack(pid) {
  tracked.delete(pid);
  persist();
}

export function killTracked(signal = 'SIGTERM') {
  for (const [pid, { group }] of tracked) {
    try { process.kill(group ? -pid : pid, signal); } catch { /* already gone */ }
  }
}

let installed = false;
export function installExitHandlers() {
  if (installed) return;
  installed = true;
  process.on('exit', () => killTracked('SIGKILL'));
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
    process.once(sig, () => {
      killTracked('SIGTERM');
      process.exit(130);
    });
  }
}
