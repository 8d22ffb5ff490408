//! Switchboard browser and Node client: one shared, self-healing connection per URL,
//! channels with gap-free resume, and chat streams that are complete exactly once.
//!
//! No runtime dependencies. The wire contract is docs/PROTOCOL.md; the reconnect rules
//! follow its section 4 table (see `closeAction`). Usage and rules: clients/js/README.md.

/** The subprotocol the client offers; the server selects it. */
export const SUBPROTOCOL = 'switchboard.v1';

/** Defaults, each overridable through `connect` options. */
export const DEFAULTS = Object.freeze({
  // First retry within 0.5 s, later ones never more than 20 s apart: quick after a blip,
  // gentle on a cluster that is down (PROTOCOL.md section 4, "reconnect with backoff").
  backoffBaseMs: 500,
  backoffCapMs: 20_000,
  // A connection that stayed authenticated this long was healthy: the next failure
  // starts the backoff from the beginning again.
  stableAfterMs: 10_000,
  // Direct replies (ack, subscribed, history...) take milliseconds; 10 s covers a
  // loaded cluster without leaving a caller hanging. Also bounds `getToken`.
  requestTimeoutMs: 10_000,
  // Browsers cannot see WebSocket pings, so an app-level `ping` finds half-open
  // sockets; 25 s matches the server's ping interval, well under its 60 s idle limit.
  pingIntervalMs: 25_000,
  // No `pong` this long after a `ping`: the socket is dead even if the OS says open.
  pongTimeoutMs: 10_000,
  // A failed refresh is tried again this often until the token expires (then the
  // server closes 4001 and the reconnect path fetches a token).
  refreshRetryMs: 5_000,
  // After a 1012 (node draining) without `retry_after_ms`: spread reconnects over 1 s,
  // the server's own jitter ceiling.
  drainJitterMs: 1_000,
  // Requests made while disconnected wait here; bounded so an app that keeps
  // publishing into a dead link fails fast instead of growing without limit.
  maxQueued: 256,
  // Chat frames whose request_id has no `ack` yet (the reply can overtake it, or it
  // belongs to another tab): kept this long and this many.
  orphanTtlMs: 10_000,
  maxOrphans: 64,
  // Request ids of chat streams that ended, remembered (at most this many) so a late
  // repeat of their frames (a redelivery, or a worker re-sending chat.complete after a
  // message-bus outage) is dropped instead of surfacing as another tab's chat.
  maxFinishedChats: 256,
  // After a reconnect, a chat stream whose end was not seen is checked against
  // `history` this often until it finishes.
  chatRecheckMs: 3_000,
  // A chat stream that hears nothing for this long fails with TIMEOUT: longer than the
  // worker's own LLM first-token timeout (60 s) plus its retries and a redelivery.
  chatIdleTimeoutMs: 180_000,
  // A chat stream silent this long on a live link is checked against `history`
  // (PROTOCOL.md: live chat events can be lost while the message bus restarts).
  chatSilenceMs: 10_000,
  // Expired tokens handed back this many times in a row (4001 before authentication)
  // stop the client: the token source is broken and retrying cannot help.
  maxTokenFailures: 3,
  // The server's default SB_MAX_MESSAGE_BYTES: a larger frame would close the
  // connection 1009, so it is refused locally instead.
  maxFrameBytes: 64 * 1024,
  // `history` entries read when filling a chat gap: the request is among the latest.
  gapHistoryLimit: 20,
});

const CHANNEL_RE = /^[a-z0-9_-]{1,64}:[A-Za-z0-9_-]{1,128}$/;
const SESSION_RE = /^[A-Za-z0-9_-]{1,128}$/;
const MAX_CHAT_CHARS = 50_000;
const WS_OPEN = 1;

/** The close code that follows each error code (PROTOCOL.md section 4). */
const ERROR_CLOSE_CODES = Object.freeze({
  AUTH_TIMEOUT: 4000,
  TOKEN_EXPIRED: 4001,
  SLOW_CONSUMER: 4008,
  RATE_LIMITED: 4029,
  TOKEN_INVALID: 4503,
  FORBIDDEN: 4503,
  CONNECTION_LIMIT: 4509,
  OVERLOADED: 1013,
  UNAVAILABLE: 1013,
  TOO_LARGE: 1009,
  INTERNAL: 1011,
});

/** Error codes the server marks retryable, plus the client's own transient ones. */
const RETRYABLE = new Set([
  'RATE_LIMITED', 'UNAVAILABLE', 'INTERNAL', 'OVERLOADED', 'AUTH_TIMEOUT', 'SLOW_CONSUMER',
  'TIMEOUT', 'DISCONNECTED', 'QUEUE_FULL', 'TOKEN_UNAVAILABLE',
]);

/** Every failure the client reports: server `error` frames, closes and local checks. */
export class SwitchboardError extends Error {
  constructor(code, message, extra = {}) {
    super(message, extra.cause === undefined ? undefined : { cause: extra.cause });
    this.name = 'SwitchboardError';
    this.code = code;
    this.retryable = extra.retryable ?? RETRYABLE.has(code);
    if (extra.closeCode !== undefined) this.closeCode = extra.closeCode;
    if (extra.retryAfterMs !== undefined) this.retryAfterMs = extra.retryAfterMs;
    if (extra.action !== undefined) this.action = extra.action;
  }

  /** From a server `error` or `chat.error` frame. */
  static fromFrame(f, closeCode) {
    return new SwitchboardError(String(f.code ?? 'INTERNAL'), String(f.message ?? 'server error'), {
      retryable: typeof f.retryable === 'boolean' ? f.retryable : undefined,
      retryAfterMs: typeof f.retry_after_ms === 'number' ? f.retry_after_ms : undefined,
      action: f.action ?? undefined,
      closeCode,
    });
  }
}

/**
 * What to do after the server closed with `code` (PROTOCOL.md section 4):
 * 'none' (normal close), 'fix' (the client broke the protocol: reconnecting would
 * repeat it), 'stop' (4500-4999: never automatically), 'refresh' (4001: new token,
 * then reconnect), 'immediate' (1012: node draining) or 'backoff' (everything else,
 * including 1006 when the link just died).
 */
export function closeAction(code) {
  if (code === 1000) return 'none';
  if (code === 1002 || code === 1003 || code === 1007 || code === 1009) return 'fix';
  if (code === 4001) return 'refresh';
  if (code === 1012) return 'immediate';
  if (code >= 4500 && code <= 4999) return 'stop';
  return 'backoff';
}

/** Full-jitter exponential backoff: random(0, min(cap, base * 2^attempt)) ms. */
export function backoffDelay(attempt, { baseMs = DEFAULTS.backoffBaseMs, capMs = DEFAULTS.backoffCapMs, random = Math.random } = {}) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(Math.max(attempt, 0), 30));
  return Math.floor(random() * ceiling);
}

/** A tiny event emitter; a throwing listener is reported, never breaks the client. */
class Emitter {
  #listeners = new Map();

  on(event, fn) {
    if (typeof fn !== 'function') throw new TypeError(`listener for "${event}" must be a function`);
    let set = this.#listeners.get(event);
    if (!set) this.#listeners.set(event, (set = new Set()));
    set.add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this.#listeners.get(event)?.delete(fn);
  }

  emit(event, arg) {
    const set = this.#listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) callSafely(fn, arg);
  }

  clear() {
    this.#listeners.clear();
  }
}

function callSafely(fn, arg) {
  try {
    fn(arg);
  } catch (e) {
    if (typeof globalThis.reportError === 'function') globalThis.reportError(e);
    else console.error('switchboard: a listener threw', e);
  }
}

/** A promise with its settle functions; its rejection is never "unhandled". */
function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => {});
  return { promise, resolve, reject };
}

function defaultUrl() {
  const loc = globalThis.location;
  if (!loc || !loc.host) return undefined;
  return `${loc.protocol === 'https:' ? 'wss' : 'ws'}://${loc.host}/ws`;
}

function badRequest(message) {
  return new SwitchboardError('BAD_REQUEST', message, { retryable: false });
}

function checkChannel(channel) {
  if (typeof channel !== 'string' || !CHANNEL_RE.test(channel)) {
    throw badRequest(`invalid channel ${JSON.stringify(channel)}: expected namespace:name ([a-z0-9_-]{1,64}:[A-Za-z0-9_-]{1,128})`);
  }
}

/** Shared connections by URL: the "one connection per page" registry. */
const registry = new Map();

/**
 * Returns a client handle. Handles made with the same `url` share one connection
 * (the first call's options win); the socket closes when the last handle is closed.
 * `shared: false` opens a private connection.
 */
export function connect(options = {}) {
  if (options === null || typeof options !== 'object') throw badRequest('connect() takes an options object');
  const url = options.url ?? defaultUrl();
  if (typeof url !== 'string' || !/^wss?:\/\//i.test(url)) {
    throw badRequest(`\`url\` must be a ws:// or wss:// URL, got ${JSON.stringify(url)}`);
  }
  if (typeof options.getToken !== 'function') {
    throw badRequest('`getToken` must be a function returning a token or a Promise of one');
  }
  if (options.shared === false) return new Connection(url, options, null).acquire();
  let conn = registry.get(url);
  if (!conn || conn.released) {
    conn = new Connection(url, options, url);
    registry.set(url, conn);
  }
  return conn.acquire();
}

/** One WebSocket and everything that must survive its reconnects. */
class Connection {
  constructor(url, options, key) {
    const WS = options.WebSocket ?? globalThis.WebSocket;
    if (typeof WS !== 'function') {
      throw badRequest('no WebSocket implementation: pass `WebSocket` (in Node 20, the `ws` package or --experimental-websocket)');
    }
    this.url = url;
    this.key = key;
    this.WebSocket = WS;
    this.getToken = options.getToken;
    const backoff = options.backoff ?? {};
    this.cfg = { ...DEFAULTS };
    for (const k of Object.keys(DEFAULTS)) {
      if (options[k] !== undefined) this.cfg[k] = options[k];
    }
    if (backoff.baseMs !== undefined) this.cfg.backoffBaseMs = backoff.baseMs;
    if (backoff.capMs !== undefined) this.cfg.backoffCapMs = backoff.capMs;
    for (const [k, v] of Object.entries(this.cfg)) {
      if (typeof v !== 'number' || !(v >= 0)) throw badRequest(`option \`${k}\` must be a non-negative number`);
    }
    this.random = options.random ?? Math.random;
    this.setTimer = options.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms));
    this.clearTimer = options.clearTimeout ?? ((t) => globalThis.clearTimeout(t));
    this.now = options.now ?? (() => Date.now());

    this.handles = new Set();
    this.released = false;
    this.state = 'idle';
    this.ws = null;
    this.generation = 0;
    this.attempt = 0;
    this.tokenFailures = 0;
    this.nextId = 0;
    this.inflight = new Map();
    this.queue = [];
    this.channels = new Map();
    this.chats = new Map();
    this.orphans = new Map();
    this.finishedChats = new Set();
    this.info = null;
    this.lastError = null;
    this.drainAfterMs = null;
    this.stopError = null;
    this.refreshing = false;
    this.timers = { retry: null, auth: null, ping: null, stable: null, refresh: null };
    this.readyWaiters = new Set();
    this.onOnline = () => {
      if (this.state === 'reconnecting') this.openNow('online');
    };
  }

  // --- handles ---

  acquire() {
    const handle = new Client(this);
    this.handles.add(handle);
    if (this.state === 'idle') {
      globalThis.addEventListener?.('online', this.onOnline);
      this.open('connect');
    }
    return handle;
  }

  release(handle) {
    this.handles.delete(handle);
    if (this.handles.size > 0 || this.released) return;
    this.released = true;
    if (this.key !== null && registry.get(this.key) === this) registry.delete(this.key);
    globalThis.removeEventListener?.('online', this.onOnline);
    const err = new SwitchboardError('CLOSED', 'the client was closed', { retryable: false });
    this.generation += 1;
    this.clearSocketTimers();
    this.clear('retry');
    const ws = this.ws;
    this.ws = null;
    if (ws) detachAndClose(ws, 1000, 'client closed');
    this.failRequests(err);
    for (const s of [...this.chats.values()]) s.fail(err);
    this.chats.clear();
    this.channels.clear();
    this.settleReady(err);
    this.setState('closed', {});
  }

  broadcast(event, arg) {
    for (const h of [...this.handles]) h.emitter.emit(event, arg);
  }

  setState(state, extra) {
    this.state = state;
    this.broadcast('status', { state, ...extra });
  }

  clear(name) {
    if (this.timers[name] !== null) {
      this.clearTimer(this.timers[name]);
      this.timers[name] = null;
    }
  }

  clearSocketTimers() {
    for (const name of ['auth', 'ping', 'stable', 'refresh']) this.clear(name);
  }

  id() {
    this.nextId += 1;
    return `c${this.nextId}`;
  }

  // --- the connection cycle ---

  openNow(reason) {
    this.clear('retry');
    this.open(reason);
  }

  async open(reason) {
    const gen = ++this.generation;
    this.setState('connecting', { attempt: this.attempt });
    let token;
    try {
      token = await this.withTimeout(Promise.resolve().then(() => this.getToken({ reason })), 'getToken');
    } catch (e) {
      if (gen !== this.generation) return;
      const err = e instanceof SwitchboardError && e.code !== 'TIMEOUT'
        ? e
        : new SwitchboardError('TOKEN_UNAVAILABLE', `getToken failed: ${e?.message ?? e}`, { retryable: true, cause: e });
      if (!err.retryable) return this.stop(err);
      return this.retry(backoffDelay(this.attempt++, this.backoffOpts()), { error: err });
    }
    if (gen !== this.generation) return;
    if (typeof token !== 'string' || token.length === 0) {
      return this.stop(badRequest('getToken must resolve to a non-empty string'));
    }
    let ws;
    try {
      ws = new this.WebSocket(this.url, [SUBPROTOCOL]);
    } catch (e) {
      return this.stop(new SwitchboardError('BAD_REQUEST', `cannot open ${this.url}: ${e?.message ?? e}`, { retryable: false, cause: e }));
    }
    this.ws = ws;
    this.lastError = null;
    this.drainAfterMs = null;
    const authId = this.id();
    this.setState('authenticating', {});
    // Opening plus authenticating gets one request timeout; a proxy that accepts and
    // then hangs must not stall the client forever.
    this.timers.auth = this.setTimer(() => {
      if (gen === this.generation) this.abandon(4000, 'no authenticated reply in time');
    }, this.cfg.requestTimeoutMs);
    ws.onopen = () => {
      if (gen !== this.generation) return;
      // The token travels in the first frame, never in the URL (URLs reach logs).
      ws.send(JSON.stringify({ type: 'auth', token, id: authId }));
    };
    ws.onmessage = (ev) => {
      if (gen !== this.generation || typeof ev.data !== 'string') return;
      this.onText(ev.data, authId);
    };
    ws.onclose = (ev) => {
      if (gen !== this.generation) return;
      this.onClose(ev.code ?? 1006, ev.reason ?? '');
    };
    ws.onerror = () => {}; // A close event always follows; it carries the code.
  }

  /** Gives up on the current socket without waiting for its close handshake. */
  abandon(code, reason) {
    const ws = this.ws;
    if (ws) detachAndClose(ws, 1000, reason);
    this.generation += 1;
    this.onClose(code, reason);
  }

  backoffOpts() {
    return { baseMs: this.cfg.backoffBaseMs, capMs: this.cfg.backoffCapMs, random: this.random };
  }

  retry(delayMs, extra) {
    this.clear('retry');
    const reason = extra.reason ?? 'reconnect';
    this.setState('reconnecting', { attempt: this.attempt, delayMs, ...extra });
    this.timers.retry = this.setTimer(() => {
      this.timers.retry = null;
      this.open(reason);
    }, delayMs);
  }

  stop(err) {
    this.clear('retry');
    this.stopError = err;
    this.failRequests(err);
    for (const s of [...this.chats.values()]) s.fail(err);
    this.chats.clear();
    this.settleReady(err);
    this.setState('stopped', { error: err, closeCode: err.closeCode });
  }

  onClose(code, reason) {
    const wasAuthenticated = this.state === 'authenticated';
    this.clearSocketTimers();
    this.ws = null;
    const last = this.lastError && ERROR_CLOSE_CODES[this.lastError.code] === code ? this.lastError : null;
    const err = last
      ? SwitchboardError.fromFrame(last, code)
      : new SwitchboardError(code === 1006 ? 'DISCONNECTED' : `CLOSED_${code}`,
        `connection closed (${code}${reason ? `: ${reason}` : ''})`, {
        closeCode: code,
        retryable: !['none', 'fix', 'stop'].includes(closeAction(code)),
      });
    this.failRequests(new SwitchboardError('DISCONNECTED', `connection lost before the reply (close ${code})`,
      { retryable: true, closeCode: code }));
    for (const s of this.chats.values()) s.interrupted = true;
    for (const ch of this.channels.values()) ch.active = false;
    if (this.released) return;
    this.broadcast('disconnected', { closeCode: code, reason, error: err });
    switch (closeAction(code)) {
      case 'none':
      case 'fix':
      case 'stop':
        return this.stop(err);
      case 'refresh':
        if (!wasAuthenticated) {
          // A token that is expired on arrival: getToken keeps handing out stale
          // tokens. Back off, and give up after a few in a row.
          this.tokenFailures += 1;
          if (this.tokenFailures >= this.cfg.maxTokenFailures) return this.stop(err);
          return this.retry(backoffDelay(this.attempt++, this.backoffOpts()), { closeCode: code, error: err, reason: 'expired' });
        }
        // Never a plain retry: the next open() asks getToken for a new token first.
        return this.retry(0, { closeCode: code, error: err, reason: 'expired' });
      case 'immediate': {
        const window = this.drainAfterMs ?? this.cfg.drainJitterMs;
        return this.retry(Math.floor(this.random() * window), { closeCode: code, error: err });
      }
      default: {
        const wait = backoffDelay(this.attempt++, this.backoffOpts()) + (last?.retry_after_ms ?? 0);
        return this.retry(wait, { closeCode: code, error: err });
      }
    }
  }

  onText(text, authId) {
    let f;
    try {
      f = JSON.parse(text);
    } catch {
      this.broadcast('error', new SwitchboardError('BAD_FRAME', 'the server sent a frame that is not JSON', { retryable: false }));
      return;
    }
    if (f === null || typeof f !== 'object' || typeof f.type !== 'string') return;
    if (f.type === 'error') this.lastError = f;
    if (f.id !== undefined && f.id !== null) {
      if (f.id === authId) {
        if (f.type === 'authenticated') this.onAuthenticated(f);
        // An auth `error` is followed by the close; onClose reports it.
        return;
      }
      const entry = this.inflight.get(String(f.id));
      if (entry) {
        this.inflight.delete(String(f.id));
        this.clearTimer(entry.timer);
        if (f.type === 'error') {
          entry.reject(SwitchboardError.fromFrame(f));
        } else {
          // Handled now, not in a later microtask: frames right behind this reply
          // (live messages after `subscribed`, chunks after an `ack`) must see its effect.
          if (entry.onReply) callSafely(entry.onReply, f);
          entry.resolve(f);
        }
        return;
      }
    }
    switch (f.type) {
      case 'message':
        return this.onMessage(f);
      case 'chat.chunk':
      case 'chat.complete':
      case 'chat.error':
        return this.onChat(f);
      case 'join':
      case 'leave':
      case 'typing':
      case 'read':
        return this.onChannelEvent(f);
      case 'unsubscribed':
        return this.onServerUnsubscribed(f);
      case 'subscribed':
        // Without `id`: the channel's offsets started over (its position was lost).
        return this.onServerRestart(f);
      case 'token_expiring':
        this.broadcast('token_expiring', { expiresAt: f.expires_at });
        return this.refresh();
      case 'reconnect':
        this.drainAfterMs = typeof f.retry_after_ms === 'number' ? f.retry_after_ms : null;
        this.broadcast('draining', { reason: f.reason, retryAfterMs: f.retry_after_ms });
        return undefined;
      case 'error':
        return this.broadcast('error', SwitchboardError.fromFrame(f));
      default:
        return undefined;
    }
  }

  onAuthenticated(f) {
    this.clear('auth');
    this.tokenFailures = 0;
    this.info = {
      user: f.user,
      expiresAt: f.expires_at,
      teams: Array.isArray(f.teams) ? f.teams : [],
      tasks: Array.isArray(f.tasks) ? f.tasks : [],
      degraded: Boolean(f.degraded),
      node: f.node,
      connId: f.conn_id,
    };
    const gen = this.generation;
    this.timers.stable = this.setTimer(() => {
      this.timers.stable = null;
      if (gen === this.generation) this.attempt = 0;
    }, this.cfg.stableAfterMs);
    this.schedulePing(gen);
    this.setState('authenticated', { node: this.info.node, degraded: this.info.degraded });
    this.broadcast('authenticated', this.info);
    // Channels first, so replayed messages precede anything the app sends next.
    for (const ch of this.channels.values()) this.subscribeChannel(ch);
    const queued = this.queue;
    this.queue = [];
    for (const entry of queued) this.transmit(entry);
    for (const s of this.chats.values()) if (s.interrupted) this.recheckChat(s);
    this.settleReady(null);
  }

  schedulePing(gen) {
    this.timers.ping = this.setTimer(async () => {
      this.timers.ping = null;
      if (gen !== this.generation) return;
      try {
        await this.request({ type: 'ping' }, this.cfg.pongTimeoutMs);
        if (gen === this.generation) this.schedulePing(gen);
      } catch (e) {
        if (gen === this.generation && e.code === 'TIMEOUT') this.abandon(1006, 'no pong: the link is dead');
      }
    }, this.cfg.pingIntervalMs);
  }

  async refresh() {
    if (this.refreshing) return;
    this.refreshing = true;
    this.clear('refresh');
    const gen = this.generation;
    try {
      const token = await this.withTimeout(Promise.resolve().then(() => this.getToken({ reason: 'refresh' })), 'getToken');
      if (gen !== this.generation) return;
      if (typeof token !== 'string' || token.length === 0) throw badRequest('getToken must resolve to a non-empty string');
      const reply = await this.request({ type: 'refresh', token });
      if (gen !== this.generation) return;
      // A new object: `info` snapshots handed out earlier stay as they were.
      if (this.info) this.info = { ...this.info, expiresAt: reply.expires_at };
      this.broadcast('refreshed', { expiresAt: reply.expires_at });
    } catch (e) {
      if (gen !== this.generation || this.released) return;
      const err = e instanceof SwitchboardError
        ? e
        : new SwitchboardError('TOKEN_UNAVAILABLE', `getToken failed: ${e?.message ?? e}`, { cause: e });
      this.broadcast('error', err);
      // The connection stays on its current token; keep trying while it is valid.
      // Once it expires the server closes 4001 and open() fetches a token anyway.
      const left = (this.info?.expiresAt ?? 0) * 1000 - this.now();
      if (left > 0) {
        this.timers.refresh = this.setTimer(() => {
          this.timers.refresh = null;
          if (gen === this.generation) this.refresh();
        }, Math.min(this.cfg.refreshRetryMs, left));
      }
    } finally {
      this.refreshing = false;
    }
  }

  withTimeout(promise, what) {
    return new Promise((resolve, reject) => {
      const ms = this.cfg.requestTimeoutMs;
      const t = this.setTimer(() => reject(new SwitchboardError('TIMEOUT', `${what} did not answer within ${ms} ms`)), ms);
      promise.then((v) => {
        this.clearTimer(t);
        resolve(v);
      }, (e) => {
        this.clearTimer(t);
        reject(e);
      });
    });
  }

  settleReady(err) {
    for (const w of this.readyWaiters) {
      if (err) w.reject(err);
      else w.resolve(this.info);
    }
    this.readyWaiters.clear();
  }

  // --- requests ---

  /**
   * Sends a frame that gets a direct reply; waits for authentication if needed.
   * `onReply` runs synchronously with the reply, before any later frame.
   */
  request(frame, timeoutMs = this.cfg.requestTimeoutMs, onReply = null) {
    if (this.released) return Promise.reject(new SwitchboardError('CLOSED', 'the client was closed', { retryable: false }));
    if (this.state === 'stopped') return Promise.reject(this.stopError);
    return new Promise((resolve, reject) => {
      const id = this.id();
      const entry = { id, frame: { ...frame, id }, resolve, reject, timer: null, onReply };
      const bytes = utf8Length(JSON.stringify(entry.frame));
      if (bytes > this.cfg.maxFrameBytes) {
        const limit = this.cfg.maxFrameBytes;
        reject(new SwitchboardError('TOO_LARGE', `frame of ${bytes} bytes is over the ${limit}-byte limit`, { retryable: false }));
        return;
      }
      entry.timer = this.setTimer(() => {
        this.inflight.delete(id);
        const i = this.queue.indexOf(entry);
        if (i >= 0) this.queue.splice(i, 1);
        reject(new SwitchboardError('TIMEOUT', `no reply to ${frame.type} within ${timeoutMs} ms`));
      }, timeoutMs);
      if (this.state === 'authenticated' && this.ws?.readyState === WS_OPEN) {
        this.transmit(entry);
      } else if (this.queue.length >= this.cfg.maxQueued) {
        this.clearTimer(entry.timer);
        reject(new SwitchboardError('QUEUE_FULL', `${this.cfg.maxQueued} requests already wait for the connection`));
      } else {
        this.queue.push(entry);
      }
    });
  }

  transmit(entry) {
    try {
      this.ws.send(JSON.stringify(entry.frame));
      this.inflight.set(entry.id, entry);
    } catch (e) {
      this.clearTimer(entry.timer);
      entry.reject(new SwitchboardError('DISCONNECTED', `send failed: ${e?.message ?? e}`, { retryable: true }));
    }
  }

  /** A frame without a direct reply (typing); dropped when not connected. */
  send(frame) {
    if (this.state !== 'authenticated' || this.ws?.readyState !== WS_OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  failRequests(err) {
    for (const entry of this.inflight.values()) {
      this.clearTimer(entry.timer);
      entry.reject(err);
    }
    this.inflight.clear();
    if (this.state === 'stopped' || this.released || err.code !== 'DISCONNECTED') {
      for (const entry of this.queue) {
        this.clearTimer(entry.timer);
        entry.reject(err);
      }
      this.queue = [];
    }
  }

  // --- channels ---

  addSubscription(sub, since, backlog, epoch) {
    let ch = this.channels.get(sub.channel);
    if (!ch) {
      ch = { name: sub.channel, subs: new Set(), lastOffset: null, epoch: epoch ?? null, active: false, since: since ?? null, backlog: backlog ?? 0, held: null };
      this.channels.set(sub.channel, ch);
      ch.subs.add(sub);
      if (this.state === 'authenticated') this.subscribeChannel(ch);
    } else {
      ch.subs.add(sub);
      if (ch.active) sub.onSubscribed({ channel: ch.name, offset: ch.lastOffset, epoch: ch.epoch, recovered: true, resumed: false, shared: true });
    }
  }

  removeSubscription(sub) {
    const ch = this.channels.get(sub.channel);
    if (!ch || !ch.subs.delete(sub) || ch.subs.size > 0) return;
    this.channels.delete(ch.name);
    if (this.state === 'authenticated') this.request({ type: 'unsubscribe', channel: ch.name }).catch(() => {});
  }

  async subscribeChannel(ch) {
    const resumed = ch.lastOffset !== null;
    const since = resumed ? ch.lastOffset : ch.since;
    if (!resumed && since !== null) ch.lastOffset = since;
    const frame = { type: 'subscribe', channel: ch.name };
    if (since !== null) frame.since = since;
    // The count `since` belongs to: offsets of an earlier one are never "recovered".
    if (since !== null && ch.epoch !== null) frame.epoch = ch.epoch;
    try {
      await this.request(frame, undefined, (reply) => this.onSubscribed(ch, reply, resumed, since));
    } catch (e) {
      if (this.channels.get(ch.name) !== ch) return;
      // A lost link resubscribes on the next authentication; anything else
      // (FORBIDDEN, a timeout on a live link) ends the subscription.
      if (e.code === 'DISCONNECTED' || this.state !== 'authenticated') return;
      this.channels.delete(ch.name);
      for (const sub of ch.subs) sub.onFailed(e);
    }
  }

  onSubscribed(ch, reply, resumed, since) {
    if (this.channels.get(ch.name) !== ch) {
      // Unsubscribed while the reply was on its way.
      if (!this.channels.has(ch.name)) this.request({ type: 'unsubscribe', channel: ch.name }).catch(() => {});
      return;
    }
    ch.active = true;
    if (!resumed && since === null && ch.backlog > 0 && reply.offset > 0 && ch.held === null) {
      this.backfill(ch, reply.offset);
      return;
    }
    const recovered = Boolean(reply.recovered);
    const previous = ch.lastOffset;
    // Unrecovered: the server's offset is the truth now, even if lower (history lost).
    ch.lastOffset = recovered && previous !== null ? Math.max(previous, reply.offset) : reply.offset;
    ch.epoch = reply.epoch ?? null;
    const info = { channel: ch.name, offset: reply.offset, epoch: ch.epoch, recovered, resumed, readOffset: reply.read_offset };
    for (const sub of [...ch.subs]) {
      sub.onSubscribed(info);
      if (since !== null && !recovered) sub.emit('reset', { ...info, lastOffset: previous });
    }
  }

  /**
   * The `backlog` option: the channel is held at `offset`; a second subscribe with
   * `since = offset - backlog` replays the recent past. Everything arriving meanwhile
   * (replay and live, possibly interleaved and overlapping) is collected by offset and
   * delivered in order once the replay ends, so the app sees one ordered stream.
   */
  async backfill(ch, offset) {
    ch.held = new Map();
    ch.lastOffset = offset;
    const since = Math.max(0, offset - ch.backlog);
    let recovered = false;
    try {
      await this.request({ type: 'subscribe', channel: ch.name, since }, undefined, (r) => {
        recovered = Boolean(r.recovered);
        ch.epoch = r.epoch ?? null;
        this.releaseHeld(ch, offset, recovered, r.read_offset);
      });
    } catch {
      // No backlog (lost link, timeout): deliver what arrived live; a reconnect
      // resumes from the last delivered offset as usual.
      this.releaseHeld(ch, offset, recovered, undefined);
    }
  }

  releaseHeld(ch, offset, recovered, readOffset) {
    if (ch.held === null) return;
    const held = [...ch.held.values()].sort((a, b) => a.offset - b.offset);
    ch.held = null;
    ch.lastOffset = offset - (recovered ? Math.min(ch.backlog, offset) : 0);
    let backlog = 0;
    for (const msg of held) {
      if (msg.offset <= offset) {
        if (!recovered) continue;
        msg.backlog = true;
        backlog += 1;
      }
      this.deliver(ch, msg);
    }
    ch.lastOffset = Math.max(ch.lastOffset, offset);
    if (this.channels.get(ch.name) !== ch) return;
    const info = { channel: ch.name, offset: ch.lastOffset, epoch: ch.epoch, recovered: true, resumed: false, readOffset, backlog };
    for (const sub of [...ch.subs]) sub.onSubscribed(info);
  }

  onMessage(f) {
    const ch = this.channels.get(f.channel);
    const msg = { channel: f.channel, offset: f.offset, data: f.data, from: f.from };
    if (ch?.held) {
      ch.held.set(f.offset, msg);
      return;
    }
    if (ch) {
      // Offsets only grow: anything at or below the last one is a replay we have.
      if (ch.lastOffset !== null && f.offset <= ch.lastOffset) return;
      this.deliver(ch, msg);
      return;
    }
    this.broadcast('message', msg);
  }

  deliver(ch, msg) {
    if (ch.lastOffset !== null && msg.offset <= ch.lastOffset) return;
    ch.lastOffset = msg.offset;
    for (const sub of [...ch.subs]) sub.emit('message', msg);
    this.broadcast('message', msg);
  }

  onChannelEvent(f) {
    const ev = { ...f };
    delete ev.type;
    const ch = this.channels.get(f.channel);
    if (ch) for (const sub of [...ch.subs]) sub.emit(f.type, ev);
    this.broadcast(f.type, ev);
  }

  /**
   * The server's `subscribed` without `id`: Redis lost the channel's position and its
   * offsets count again from `f.offset` in a new epoch. What came before is not
   * recoverable: the app hears `reset` and reloads; messages go on from the new count.
   */
  onServerRestart(f) {
    const ch = this.channels.get(f.channel);
    if (!ch) return;
    const previous = ch.lastOffset;
    ch.lastOffset = f.offset;
    ch.epoch = f.epoch ?? null;
    // A backlog replay in progress belongs to the old count.
    if (ch.held) ch.held = new Map();
    const info = { channel: ch.name, offset: f.offset, epoch: ch.epoch, recovered: false, resumed: false };
    for (const sub of [...ch.subs]) {
      sub.offset = f.offset;
      sub.recovered = false;
      sub.emit('reset', { ...info, lastOffset: previous });
    }
  }

  onServerUnsubscribed(f) {
    const ch = this.channels.get(f.channel);
    if (!ch) return;
    this.channels.delete(f.channel);
    const err = new SwitchboardError('UNSUBSCRIBED', `the server ended the subscription to ${f.channel}`, { retryable: false });
    for (const sub of [...ch.subs]) sub.onFailed(err);
  }

  // --- chat ---

  async startChat(stream) {
    const frame = { type: 'chat.send', message: stream.message };
    if (stream.sessionId) frame.session_id = stream.sessionId;
    try {
      await this.request(frame, undefined, (ack) => this.onChatAccepted(stream, ack));
    } catch (e) {
      if (e.code === 'DISCONNECTED') {
        e.message = `${e.message}; the message may or may not have been accepted (check history)`;
      }
      stream.fail(e);
    }
  }

  onChatAccepted(stream, ack) {
    if (stream.finished) return;
    stream.accept(ack.request_id, ack.session_id);
    this.chats.set(ack.request_id, stream);
    const early = this.orphans.get(ack.request_id);
    if (early) {
      this.orphans.delete(ack.request_id);
      for (const f of early.frames) stream.onFrame(f);
    }
  }

  onChat(f) {
    const stream = this.chats.get(f.request_id);
    if (stream) {
      stream.onFrame(f);
      return;
    }
    if (this.finishedChats.has(f.request_id)) return;
    // The reply may overtake its ack, or belong to another tab of the same user.
    this.broadcast('chat', { ...f });
    const now = this.now();
    for (const [rid, o] of this.orphans) {
      if (now - o.at > this.cfg.orphanTtlMs) this.orphans.delete(rid);
    }
    let o = this.orphans.get(f.request_id);
    if (!o) {
      if (this.orphans.size >= this.cfg.maxOrphans) this.orphans.delete(this.orphans.keys().next().value);
      o = { at: now, frames: [] };
      this.orphans.set(f.request_id, o);
    }
    o.frames.push(f);
  }

  rememberFinished(requestId) {
    const done = this.finishedChats;
    done.delete(requestId);
    done.add(requestId);
    // A Set iterates in insertion order: the first entry is the oldest.
    if (done.size > this.cfg.maxFinishedChats) done.delete(done.values().next().value);
  }

  async recheckChat(stream) {
    if (stream.finished || stream.rechecking) return;
    stream.rechecking = true;
    // One polling loop per stream, even across several reconnects.
    for (const t of stream.recheckTimers) this.clearTimer(t);
    stream.recheckTimers.clear();
    try {
      const h = await this.request({ type: 'history', session_id: stream.sessionId, limit: this.cfg.gapHistoryLimit });
      const entry = (h.messages ?? []).find((m) => m.role === 'assistant' && m.request_id === stream.requestId);
      if (entry) {
        stream.finish(entry.content, 'history');
        return;
      }
    } catch {
      // Checked again below or on the next authentication.
    } finally {
      stream.rechecking = false;
    }
    if (!stream.finished && this.state === 'authenticated') {
      // The reply is still being generated (history records it before chat.complete
      // is sent, so the live complete will arrive); check again as insurance.
      const t = this.setTimer(() => stream.recheckTimers.delete(t) && this.recheckChat(stream), this.cfg.chatRecheckMs);
      stream.recheckTimers.add(t);
    }
  }
}

function detachAndClose(ws, code, reason) {
  ws.onopen = null;
  ws.onmessage = null;
  ws.onclose = null;
  ws.onerror = () => {};
  try {
    ws.close(code, reason.slice(0, 100));
  } catch {
    // Already closed or never opened: nothing to release.
  }
}

function utf8Length(s) {
  return new TextEncoder().encode(s).length;
}

/** One `subscribe()` call: handlers plus a promise for the first `subscribed`. */
class Subscription {
  constructor(handle, channel, handlers) {
    this.handle = handle;
    this.channel = channel;
    this.handlers = handlers;
    this.emitter = new Emitter();
    this.closed = false;
    this.offset = null;
    this.recovered = null;
    const ready = deferred();
    this.readyDeferred = ready;
    /** Resolves with the first `{offset, recovered}`; rejects if the server refuses. */
    this.ready = ready.promise;
    const map = {
      message: 'onMessage', subscribed: 'onSubscribed', reset: 'onReset', join: 'onJoin',
      leave: 'onLeave', typing: 'onTyping', read: 'onRead', error: 'onError',
    };
    for (const [event, name] of Object.entries(map)) {
      if (typeof handlers[name] === 'function') this.emitter.on(event, handlers[name]);
    }
  }

  on(event, fn) {
    return this.emitter.on(event, fn);
  }

  emit(event, arg) {
    if (!this.closed) this.emitter.emit(event, arg);
  }

  onSubscribed(info) {
    this.offset = info.offset;
    this.recovered = info.recovered;
    this.readyDeferred.resolve(info);
    this.emit('subscribed', info);
  }

  onFailed(err) {
    this.readyDeferred.reject(err);
    this.emit('error', err);
    this.closed = true;
    this.handle.subs.delete(this);
  }

  /** Stops this subscription; the channel is left when its last subscriber goes. */
  unsubscribe() {
    if (this.closed) return;
    this.closed = true;
    this.handle.subs.delete(this);
    this.handle.conn.removeSubscription(this);
    this.readyDeferred.reject(new SwitchboardError('CLOSED', 'unsubscribed', { retryable: false }));
    this.emitter.clear();
  }
}

/**
 * A chat reply: an async iterator of chunks `{content, text, seq, reset}` (append
 * `content`; when `reset` is true replace everything shown with `text`), plus
 * `.done` (the complete text), `.accepted`, `.requestId`, `.sessionId`, `.cancel()`.
 */
class ChatStream {
  constructor(handle, message, sessionId) {
    this.handle = handle;
    this.conn = handle.conn;
    this.message = message;
    this.sessionId = sessionId ?? null;
    this.requestId = null;
    this.text = '';
    this.chunks = [];
    this.nextSeq = 0;
    this.ahead = new Map();
    this.finished = false;
    this.error = null;
    this.interrupted = false;
    this.rechecking = false;
    this.recheckTimers = new Set();
    this.idleTimer = null;
    this.silenceTimer = null;
    this.waiters = new Set();
    const done = deferred();
    const accepted = deferred();
    this.doneDeferred = done;
    this.acceptedDeferred = accepted;
    this.done = done.promise;
    this.accepted = accepted.promise;
  }

  accept(requestId, sessionId) {
    this.requestId = requestId;
    this.sessionId = sessionId;
    this.acceptedDeferred.resolve({ requestId, sessionId });
    this.touch();
  }

  touch() {
    if (this.idleTimer !== null) this.conn.clearTimer(this.idleTimer);
    this.idleTimer = this.conn.setTimer(() => {
      this.fail(new SwitchboardError('TIMEOUT', `no reply to chat request ${this.requestId} for ${this.conn.cfg.chatIdleTimeoutMs} ms`));
    }, this.conn.cfg.chatIdleTimeoutMs);
    if (this.silenceTimer !== null) this.conn.clearTimer(this.silenceTimer);
    this.silenceTimer = this.conn.setTimer(() => {
      this.silenceTimer = null;
      if (!this.finished && this.conn.state === 'authenticated') this.conn.recheckChat(this);
    }, this.conn.cfg.chatSilenceMs);
  }

  onFrame(f) {
    if (this.finished) return;
    this.touch();
    if (f.type === 'chat.complete') return this.finish(String(f.content ?? ''), 'complete', f.usage);
    if (f.type === 'chat.error') return this.fail(SwitchboardError.fromFrame(f));
    const seq = f.seq;
    if (typeof seq !== 'number' || seq < this.nextSeq || this.ahead.has(seq)) return; // duplicate
    this.ahead.set(seq, String(f.content ?? ''));
    // Chunks past a gap wait here; the gap is filled by chat.complete or history.
    while (this.ahead.has(this.nextSeq)) {
      const content = this.ahead.get(this.nextSeq);
      this.ahead.delete(this.nextSeq);
      this.push({ content, text: this.text + content, seq: this.nextSeq, reset: false });
      this.nextSeq += 1;
    }
  }

  push(chunk) {
    this.text = chunk.text;
    this.chunks.push(chunk);
    this.wake();
  }

  /** The authoritative text arrived (chat.complete or history): emit what is missing. */
  finish(content, source, usage) {
    if (this.finished) return;
    if (content.startsWith(this.text)) {
      const rest = content.slice(this.text.length);
      if (rest.length > 0) this.push({ content: rest, text: content, seq: null, reset: false });
    } else {
      // A redelivered request regenerated a different reply: replace what was shown.
      this.push({ content, text: content, seq: null, reset: true });
    }
    this.source = source;
    this.usage = usage;
    this.end();
    this.doneDeferred.resolve(content);
  }

  fail(err) {
    if (this.finished) return;
    this.error = err;
    this.acceptedDeferred.reject(err);
    this.end();
    this.doneDeferred.reject(err);
  }

  end() {
    this.finished = true;
    if (this.idleTimer !== null) this.conn.clearTimer(this.idleTimer);
    if (this.silenceTimer !== null) this.conn.clearTimer(this.silenceTimer);
    for (const t of this.recheckTimers) this.conn.clearTimer(t);
    this.recheckTimers.clear();
    if (this.requestId !== null && this.conn.chats.get(this.requestId) === this) {
      this.conn.chats.delete(this.requestId);
      this.conn.rememberFinished(this.requestId);
    }
    this.handle.streams.delete(this);
    this.wake();
  }

  wake() {
    for (const w of this.waiters) w();
    this.waiters.clear();
  }

  /** Asks the worker to stop; `done` then resolves with the text generated so far. */
  async cancel() {
    if (this.finished) return;
    await this.accepted;
    if (this.finished) return;
    await this.conn.request({ type: 'chat.cancel', request_id: this.requestId });
  }

  [Symbol.asyncIterator]() {
    let index = 0;
    return {
      next: async () => {
        for (;;) {
          if (index < this.chunks.length) return { value: this.chunks[index++], done: false };
          if (this.finished) {
            if (this.error) throw this.error;
            return { value: undefined, done: true };
          }
          await new Promise((resolve) => this.waiters.add(resolve));
        }
      },
      return: async () => {
        index = Infinity;
        return { value: undefined, done: true };
      },
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }
}

/** What `connect` returns: a handle on a (possibly shared) connection. */
class Client {
  constructor(conn) {
    this.conn = conn;
    this.emitter = new Emitter();
    this.subs = new Set();
    this.streams = new Set();
    this.closed = false;
    /** Chat: `send({message, sessionId?})` and `history(sessionId, {limit?})`. */
    this.chat = Object.freeze({
      send: (opts) => this.chatSend(opts),
      history: (sessionId, opts) => this.chatHistory(sessionId, opts),
    });
  }

  /** 'connecting' | 'authenticating' | 'authenticated' | 'reconnecting' | 'stopped' | 'closed'. */
  get status() {
    return this.closed ? 'closed' : this.conn.state;
  }

  /** The last `authenticated` frame: {user, teams, tasks, node, connId, degraded, expiresAt}. */
  get info() {
    return this.conn.info;
  }

  /** Why the client stopped (4503, 4509, ...), when it did. */
  get error() {
    return this.conn.stopError;
  }

  /** Events: status, authenticated, disconnected, draining, token_expiring, refreshed, error, message, chat, join, leave, typing, read. */
  on(event, fn) {
    return this.emitter.on(event, fn);
  }

  off(event, fn) {
    this.emitter.off(event, fn);
  }

  /** Resolves with `info` once authenticated; rejects if the client stops first. */
  ready({ timeoutMs } = {}) {
    this.assertOpen();
    if (this.conn.state === 'authenticated') return Promise.resolve(this.conn.info);
    if (this.conn.state === 'stopped') return Promise.reject(this.conn.stopError);
    const d = deferred();
    this.conn.readyWaiters.add(d);
    if (timeoutMs === undefined) return d.promise;
    const t = this.conn.setTimer(() => {
      this.conn.readyWaiters.delete(d);
      d.reject(new SwitchboardError('TIMEOUT', `not authenticated within ${timeoutMs} ms`));
    }, timeoutMs);
    d.promise.then(() => this.conn.clearTimer(t), () => this.conn.clearTimer(t));
    return d.promise;
  }

  /** Starts a stopped client again (after signing in again, say). */
  reconnect() {
    this.assertOpen();
    const conn = this.conn;
    if (conn.state !== 'stopped' && conn.state !== 'reconnecting') return;
    conn.attempt = 0;
    conn.tokenFailures = 0;
    conn.stopError = null;
    conn.openNow('connect');
  }

  subscribe(channel, handlers = {}, { since, epoch, backlog } = {}) {
    this.assertOpen();
    checkChannel(channel);
    if (handlers === null || typeof handlers !== 'object') throw badRequest('subscribe handlers must be an object');
    if (since !== undefined && !(Number.isInteger(since) && since >= 0)) throw badRequest('`since` must be a non-negative integer offset');
    if (backlog !== undefined && !(Number.isInteger(backlog) && backlog >= 0)) throw badRequest('`backlog` must be a non-negative integer');
    if (since !== undefined && backlog) throw badRequest('pass `since` or `backlog`, not both');
    if (epoch !== undefined && (typeof epoch !== 'string' || since === undefined)) throw badRequest('`epoch` must be the string from `subscribed`, given with `since`');
    const sub = new Subscription(this, channel, handlers);
    this.subs.add(sub);
    this.conn.addSubscription(sub, since, backlog, epoch);
    return sub;
  }

  async publish(channel, data, { timeoutMs } = {}) {
    this.assertOpen();
    checkChannel(channel);
    if (data === undefined || typeof data === 'function') throw badRequest('publish `data` must be JSON-serialisable');
    const ack = await this.conn.request({ type: 'publish', channel, data }, timeoutMs);
    return { offset: ack.offset };
  }

  async presence(channel) {
    this.assertOpen();
    checkChannel(channel);
    const reply = await this.conn.request({ type: 'presence', channel });
    return reply.users ?? [];
  }

  /** Tells the channel's other users this one is typing; false when not connected. */
  typing(channel) {
    this.assertOpen();
    checkChannel(channel);
    return this.conn.send({ type: 'typing', channel });
  }

  async read(channel, offset) {
    this.assertOpen();
    checkChannel(channel);
    if (!(Number.isInteger(offset) && offset >= 0)) throw badRequest('`offset` must be a non-negative integer');
    const ack = await this.conn.request({ type: 'read', channel, offset });
    return { offset: ack.offset };
  }

  async ping() {
    this.assertOpen();
    const t0 = this.conn.now();
    await this.conn.request({ type: 'ping' });
    return { rttMs: this.conn.now() - t0 };
  }

  chatSend({ message, sessionId } = {}) {
    this.assertOpen();
    if (typeof message !== 'string' || message.length === 0) throw badRequest('chat `message` must be a non-empty string');
    if ([...message].length > MAX_CHAT_CHARS) throw badRequest(`chat \`message\` is over ${MAX_CHAT_CHARS} characters`);
    if (sessionId !== undefined && sessionId !== null && !(typeof sessionId === 'string' && SESSION_RE.test(sessionId))) {
      throw badRequest('`sessionId` must match [A-Za-z0-9_-]{1,128}');
    }
    const stream = new ChatStream(this, message, sessionId);
    this.streams.add(stream);
    this.conn.startChat(stream);
    return stream;
  }

  async chatHistory(sessionId, { limit } = {}) {
    this.assertOpen();
    if (typeof sessionId !== 'string' || !SESSION_RE.test(sessionId)) throw badRequest('`sessionId` must match [A-Za-z0-9_-]{1,128}');
    const frame = { type: 'history', session_id: sessionId };
    if (limit !== undefined) frame.limit = limit;
    const reply = await this.conn.request(frame);
    return reply.messages ?? [];
  }

  /** Releases this handle: its subscriptions and streams end; the socket closes with the last handle. */
  close() {
    if (this.closed) return;
    this.closed = true;
    for (const sub of [...this.subs]) sub.unsubscribe();
    const err = new SwitchboardError('CLOSED', 'the client was closed', { retryable: false });
    for (const s of [...this.streams]) s.fail(err);
    this.conn.release(this);
    this.emitter.clear();
  }

  assertOpen() {
    if (this.closed) throw new SwitchboardError('CLOSED', 'this client handle was closed', { retryable: false });
  }
}
