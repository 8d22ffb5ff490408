// Helpers for tests against a running local cluster (scripts/cluster up --detach):
// its URLs and run dir, sign-in, token minting, the ops API, and a WebSocket that
// records what the client sends and can be told to duplicate what it receives.
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { execFile, execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(here, '../../..');
export const BASE_URL = (process.env.SB_CLUSTER_URL ?? 'http://127.0.0.1:18080').replace(/\/$/, '');
export const RUN = path.resolve(REPO, process.env.SB_CLUSTER_RUN ?? '.run/cluster');
export const WS_URL = `${BASE_URL.replace(/^http/, 'ws')}/ws`;
// Every HTTP call of the tests gets this long.
const HTTP_TIMEOUT_MS = 10_000;

const NativeWebSocket = globalThis.WebSocket;
if (typeof NativeWebSocket !== 'function') {
  throw new Error('no global WebSocket: run node with --experimental-websocket (Node 20) or use Node 22+');
}

export function runFile(name) {
  return readFileSync(path.join(RUN, name), 'utf8').trim();
}

/** A user name no other test (or earlier run) uses, so per-user limits never collide. */
export function uniqueUser(prefix) {
  return `${prefix}-${randomUUID().slice(0, 8)}`;
}

async function http(method, url, { body, headers = {} } = {}) {
  const res = await fetch(url, {
    method,
    headers: { ...(body === undefined ? {} : { 'content-type': 'application/json' }), ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(HTTP_TIMEOUT_MS),
  });
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    // Not JSON: the caller gets the status and raw text.
  }
  return { status: res.status, json, text, headers: res.headers };
}

/** POST /api/auth/login on the stand-in backend: {token, user, expires_at}. */
export async function login(user) {
  const r = await http('POST', `${BASE_URL}/api/auth/login`, { body: { user } });
  if (r.status !== 200) throw new Error(`login ${user}: HTTP ${r.status} ${r.text}`);
  return r.json;
}

/** The ops API behind HAProxy, with the cluster's API key. */
export function api(method, p, body) {
  return http(method, `${BASE_URL}${p}`, { body, headers: { authorization: `Bearer ${runFile('api_key')}` } });
}

/**
 * An HS256 JWT signed with the cluster's secret; `ttlSecs` may be tiny or negative.
 * Minted by the repository's one minter (`mint-token`, built by scripts/cluster).
 */
export function mintToken(user, ttlSecs) {
  const bin = path.join(REPO, 'target/release/mint-token');
  const args = [user, '--ttl', String(ttlSecs), '--secret-file', path.join(RUN, 'secret')];
  return execFileSync(bin, args, { encoding: 'utf8' }).trim();
}

/**
 * A WebSocket class per test that records constructions, sent frames and received
 * frames. `duplicate(frame)` returning true delivers that frame twice (a transport
 * that redelivers), to prove the client drops duplicates.
 */
export function spySocket({ duplicate = () => false } = {}) {
  const log = { opened: [], sent: [], received: [] };
  class Spy extends NativeWebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      log.opened.push({ at: Date.now(), url, protocols, socket: this });
      const wrap = (handler) => (ev) => {
        let frame = null;
        try {
          frame = JSON.parse(ev.data);
        } catch {
          // Binary or not JSON: passed through untouched.
        }
        if (frame) log.received.push(frame);
        handler(ev);
        if (frame && duplicate(frame)) handler(ev);
      };
      let onmessage = null;
      Object.defineProperty(this, 'onmessage', {
        get: () => onmessage,
        set: (fn) => {
          onmessage = fn;
          super.onmessage = fn ? wrap(fn) : null;
        },
      });
    }

    send(data) {
      log.sent.push(JSON.parse(data));
      super.send(data);
    }
  }
  return { WebSocket: Spy, log };
}

/** Resolves when `pred()` is truthy, polling every 25 ms; rejects after `timeoutMs`. */
export async function waitFor(pred, timeoutMs, what) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await pred();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(25);
  }
}

/** Resolves with the first event `name` of `client` matching `pred`. */
export function nextEvent(client, name, pred = () => true, timeoutMs = 15_000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => {
      off();
      reject(new Error(`no "${name}" event within ${timeoutMs} ms`));
    }, timeoutMs);
    const off = client.on(name, (ev) => {
      if (!pred(ev)) return;
      clearTimeout(t);
      off();
      resolve(ev);
    });
  });
}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** Runs scripts/cluster (or $SB_CLUSTER_SCRIPT) with `args`, e.g. ['restart', 'gw1']. */
export function clusterScript(args, timeoutMs = 120_000) {
  return new Promise((resolve, reject) => {
    // The binaries refuse SB_* variables they do not know: pass on only the run dir.
    const env = { ...process.env, SB_CLUSTER_RUN: RUN };
    delete env.SB_CLUSTER_URL;
    delete env.SB_CLUSTER_SCRIPT;
    const script = process.env.SB_CLUSTER_SCRIPT ?? path.join(REPO, 'scripts/cluster');
    execFile(script, args, { cwd: REPO, timeout: timeoutMs, env }, (err, stdout, stderr) => {
      if (err) reject(new Error(`scripts/cluster ${args.join(' ')} failed: ${err.message}\n${stdout}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

/** PID of a cluster component from $RUN/pid/<name>. */
export function componentPid(name) {
  return Number(runFile(`pid/${name}`));
}
