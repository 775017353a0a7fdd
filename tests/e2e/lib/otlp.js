// The OTLP/HTTP trace receiver: the repository's example binary `otlp_receiver`
// (examples/otlp_receiver.rs, the Rust tests' receiver in tests/support/otlp.rs). It decodes
// each export with OpenTelemetry's protobuf definitions (the opentelemetry-proto crate) and
// lists every span it holds at GET /spans, as
//   { service_name, trace_id, span_id, parent_span_id, trace_state, name, kind, attributes, status }
// (ids lowercase hex, the parent's empty for a root span; trace_state the W3C tracestate;
// kind SPAN_KIND_SERVER, …; attribute values as text; status { code: STATUS_CODE_UNSET|OK|ERROR,
// message }).
// The gateway and the instrumented IAM server (lib/iam.js) export to the same receiver, so
// one trace can hold the spans of both.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { createWriteStream, existsSync } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';

import { REPO_ROOT, sleep } from './gateway.js';
import { track, untrack } from './procs.js';

export function receiverBinary() {
  const bin = process.env.OTLP_RECEIVER_BIN || path.join(REPO_ROOT, 'target/debug/examples/otlp_receiver');
  if (!existsSync(bin)) {
    throw new Error(`no OTLP receiver at ${bin}: build it (cargo build --locked --example otlp_receiver) or set OTLP_RECEIVER_BIN`);
  }
  return bin;
}

/**
 * Starts the receiver; ready once it printed `otlp_receiver listening <endpoint>`.
 * Its stderr (one line per span received) goes to `<dir>/otlp_receiver.log`. Its stdin is a
 * pipe from this process: it exits when that closes, so it does not outlive the tests.
 * @param {object} o
 * @param {string} o.dir where the log goes
 */
export async function startReceiver({ dir }) {
  const logFile = path.join(dir, 'otlp_receiver.log');
  const log = createWriteStream(logFile);
  const child = spawn(receiverBinary(), [], { stdio: ['pipe', 'pipe', 'pipe'] });
  child.stderr.pipe(log);
  track('otlp_receiver', child.pid, false);
  const exited = once(child, 'exit');

  const lines = createInterface({ input: child.stdout });
  let timer;
  const first = await Promise.race([
    once(lines, 'line').then(([line]) => line),
    exited.then(([code, signal]) => { throw new Error(`otlp_receiver exited (${code ?? signal}) before listening; see ${logFile}`); }),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`otlp_receiver printed nothing within 10s; see ${logFile}`)), 10_000);
    }),
  ]).finally(() => clearTimeout(timer));
  const match = /^otlp_receiver listening (http:\/\/127\.0\.0\.1:\d+\/v1\/traces)$/.exec(first);
  if (!match) throw new Error(`otlp_receiver said ${JSON.stringify(first)}`);
  const endpoint = match[1];
  const spansUrl = new URL('/spans', endpoint).href;

  const receiver = {
    /** http://127.0.0.1:PORT/v1/traces: where the exporters send. */
    endpoint,
    spansUrl,
    logFile,
    pid: child.pid,
    /** Every span received so far. */
    async spans() {
      const res = await fetch(spansUrl);
      if (res.status !== 200) throw new Error(`GET /spans answered ${res.status}`);
      return res.json();
    },
    /**
     * Polls GET /spans until `check(spans)` returns a truthy value, and returns that value;
     * after `timeoutMs`, throws with `what` and every span held.
     */
    async waitFor(what, check, { timeoutMs = 10_000 } = {}) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const spans = await receiver.spans();
        const found = check(spans);
        if (found) return found;
        if (Date.now() > deadline) {
          throw new Error(`${what}: not within ${timeoutMs / 1000}s; the receiver holds ${spans.length} span(s):\n${formatSpans(spans)}`);
        }
        await sleep(100);
      }
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.stdin.end(); // it exits when its input closes
        const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
        await exited;
        clearTimeout(timer);
      }
      untrack(child.pid);
      log.end();
    },
  };
  return receiver;
}

/** One line per span: `service KIND "name" trace=… span=… parent=… {attributes}`. */
export function formatSpans(spans) {
  if (spans.length === 0) return '(no spans)';
  return spans.map((s) => `${s.service_name} ${s.kind} ${JSON.stringify(s.name)} trace=${s.trace_id} span=${s.span_id} parent=${s.parent_span_id || '-'} ${JSON.stringify(s.attributes)}`).join('\n');
}

/** Whether `child` is a child of `parent`: same trace, and its parent is that span. */
export function isChildOf(child, parent) {
  return child.trace_id === parent.trace_id && child.parent_span_id !== '' && child.parent_span_id === parent.span_id;
}

/** A W3C traceparent (sampled) with random ids, and those ids. */
export function randomTraceparent() {
  const traceId = randomBytes(16).toString('hex');
  const spanId = randomBytes(8).toString('hex');
  return { traceId, spanId, header: `00-${traceId}-${spanId}-01` };
}
