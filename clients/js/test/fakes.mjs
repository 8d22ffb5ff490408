// Test doubles for the unit tests: a scripted WebSocket and a virtual clock. Not a
// server: every frame a test wants the client to see is pushed by the test itself.

/** A WebSocket whose server side the test drives. */
export class FakeSocket {
  static instances = [];

  static reset() {
    FakeSocket.instances = [];
  }

  static get last() {
    return FakeSocket.instances[FakeSocket.instances.length - 1];
  }

  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.instances.push(this);
  }

  send(text) {
    if (this.readyState !== 1) throw new Error('not open');
    this.sent.push(JSON.parse(text));
  }

  close(code = 1000, reason = '') {
    this.closedWith = { code, reason };
    this.readyState = 3;
  }

  // --- the server side ---

  open() {
    this.readyState = 1;
    this.onopen?.({});
  }

  push(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  serverClose(code, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  /** The last sent frame of `type`. */
  lastSent(type) {
    return [...this.sent].reverse().find((f) => f.type === type);
  }

  sentOf(type) {
    return this.sent.filter((f) => f.type === type);
  }

  /** Opens and answers the auth frame. */
  authenticate(extra = {}) {
    this.open();
    const auth = this.lastSent('auth');
    this.push({
      type: 'authenticated',
      id: auth.id,
      user: { id: 'alice' },
      expires_at: Math.floor(Date.now() / 1000) + 3600,
      teams: [{ id: 'demo' }],
      tasks: [],
      degraded: false,
      node: 'gw1',
      conn_id: `c-${FakeSocket.instances.length}`,
      ...extra,
    });
  }
}

/** Lets pending promise callbacks run. */
export async function flush() {
  for (let i = 0; i < 20; i++) await Promise.resolve();
  await new Promise((r) => setImmediate(r));
}

/** A virtual clock: timers run only when the test advances time. */
export class Clock {
  constructor() {
    this.t = 0;
    this.seq = 0;
    this.timers = new Map();
    this.setTimeout = (fn, ms) => {
      const id = ++this.seq;
      this.timers.set(id, { at: this.t + Math.max(0, ms), fn });
      return id;
    };
    this.clearTimeout = (id) => this.timers.delete(id);
    this.now = () => this.t;
  }

  /** Runs every timer due within `ms`, in time order, letting promises settle between. */
  async advance(ms) {
    const end = this.t + ms;
    await flush();
    for (;;) {
      let next = null;
      for (const [id, tm] of this.timers) {
        if (tm.at <= end && (next === null || tm.at < next[1].at)) next = [id, tm];
      }
      if (!next) break;
      this.timers.delete(next[0]);
      this.t = next[1].at;
      next[1].fn();
      await flush();
    }
    this.t = end;
  }
}
