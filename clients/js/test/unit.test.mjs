// Unit tests of the client's rules with a scripted socket and a virtual clock: the
// close-code table, backoff bounds, token handling, sharing, resume and chat gaps.
// The same behaviours are checked against a live cluster in live.test.mjs.
import { test, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import { connect, backoffDelay, closeAction, SwitchboardError, SUBPROTOCOL, DEFAULTS } from '../switchboard.js';
import { FakeSocket, Clock, flush } from './fakes.mjs';

let clock;
let urlSeq = 0;

beforeEach(() => {
  FakeSocket.reset();
  clock = new Clock();
});

/** A private URL per test so the shared-connection registry never crosses tests. */
function freshUrl() {
  urlSeq += 1;
  return `ws://unit-${urlSeq}.test/ws`;
}

function client(extra = {}) {
  const tokens = [];
  const c = connect({
    url: freshUrl(),
    WebSocket: FakeSocket,
    getToken: async (ctx) => {
      tokens.push(ctx.reason);
      return `tok-${tokens.length}`;
    },
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: clock.now,
    random: () => 0.999,
    ...extra,
  });
  return { c, tokens };
}

/** Advances the clock until the client opens its next socket. */
async function nextSocket(maxMs = 30_000) {
  const before = FakeSocket.instances.length;
  for (let t = 0; t < maxMs && FakeSocket.instances.length === before; t += 50) await clock.advance(50);
  assert.equal(FakeSocket.instances.length, before + 1, 'the client reconnected');
  return FakeSocket.last;
}

async function connected(extra) {
  const r = client(extra);
  await flush();
  FakeSocket.last.authenticate();
  await flush();
  assert.equal(r.c.status, 'authenticated');
  return r;
}

test('backoff is full jitter under min(cap, base * 2^attempt)', () => {
  for (let attempt = 0; attempt < 12; attempt++) {
    const ceiling = Math.min(DEFAULTS.backoffCapMs, DEFAULTS.backoffBaseMs * 2 ** attempt);
    assert.equal(backoffDelay(attempt, { random: () => 0 }), 0);
    assert.equal(backoffDelay(attempt, { random: () => 0.999999 }), ceiling - 1);
    let max = 0;
    for (let i = 0; i < 500; i++) {
      const d = backoffDelay(attempt);
      assert.ok(d >= 0 && d < ceiling, `attempt ${attempt}: ${d} outside [0, ${ceiling})`);
      max = Math.max(max, d);
    }
    // Full jitter really spreads: 500 draws reach the upper half of the window.
    assert.ok(max >= ceiling / 2, `attempt ${attempt}: max ${max} of ${ceiling}`);
  }
  assert.equal(DEFAULTS.backoffBaseMs, 500);
  assert.equal(DEFAULTS.backoffCapMs, 20_000);
  assert.equal(backoffDelay(50, { random: () => 0.5 }), 10_000);
});

test('close codes follow PROTOCOL.md section 4', () => {
  const table = {
    1000: 'none', 1001: 'backoff', 1002: 'fix', 1003: 'fix', 1006: 'backoff', 1007: 'fix', 1009: 'fix',
    1011: 'backoff', 1012: 'immediate', 1013: 'backoff', 4000: 'backoff', 4001: 'refresh', 4008: 'backoff',
    4029: 'backoff', 4499: 'backoff', 4500: 'stop', 4503: 'stop', 4509: 'stop', 4999: 'stop',
  };
  for (const [code, action] of Object.entries(table)) assert.equal(closeAction(Number(code)), action, `close ${code}`);
});

test('never opens a socket before getToken resolves; the token goes in the auth frame', async () => {
  let release;
  const gate = new Promise((r) => (release = r));
  const c = connect({ url: freshUrl(), WebSocket: FakeSocket, getToken: () => gate, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout });
  await flush();
  assert.equal(FakeSocket.instances.length, 0);
  assert.equal(c.status, 'connecting');
  release('secret-token');
  await flush();
  assert.equal(FakeSocket.instances.length, 1);
  const ws = FakeSocket.last;
  assert.ok(!ws.url.includes('secret-token'), 'token must not be in the URL');
  assert.deepEqual(ws.protocols, [SUBPROTOCOL]);
  ws.open();
  assert.equal(ws.sent.length, 1);
  assert.equal(ws.sent[0].type, 'auth');
  assert.equal(ws.sent[0].token, 'secret-token');
  c.close();
});

test('connect() with the same url shares one socket until the last handle closes', async () => {
  const url = freshUrl();
  const opts = { url, WebSocket: FakeSocket, getToken: async () => 't', setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout };
  const handles = [connect(opts), connect(opts), connect(opts)];
  await flush();
  assert.equal(FakeSocket.instances.length, 1);
  const ws = FakeSocket.last;
  ws.authenticate();
  await flush();
  const seen = [];
  handles.forEach((h, i) => h.subscribe('team:demo', { onMessage: (m) => seen.push([i, m.offset]) }));
  assert.equal(ws.sentOf('subscribe').length, 1, 'one server subscription for three subscribers');
  ws.push({ type: 'subscribed', id: ws.lastSent('subscribe').id, channel: 'team:demo', offset: 4, recovered: false });
  ws.push({ type: 'message', channel: 'team:demo', offset: 5, data: 'x', from: 'bob' });
  assert.deepEqual(seen, [[0, 5], [1, 5], [2, 5]]);
  handles[0].close();
  handles[1].close();
  assert.equal(ws.closedWith, null);
  handles[2].close();
  assert.equal(ws.closedWith.code, 1000);
  // A new connect() after the last release opens a fresh connection.
  const again = connect(opts);
  await flush();
  assert.equal(FakeSocket.instances.length, 2);
  again.close();
});

for (const code of [4503, 4509]) {
  test(`close ${code} stops: no retry, a typed error`, async () => {
    const { c, tokens } = await connected();
    const ws = FakeSocket.last;
    const states = [];
    c.on('status', (s) => states.push(s.state));
    ws.push({ type: 'error', code: code === 4503 ? 'FORBIDDEN' : 'CONNECTION_LIMIT', message: 'no', retryable: false });
    ws.serverClose(code);
    await clock.advance(120_000);
    assert.equal(FakeSocket.instances.length, 1);
    assert.equal(tokens.length, 1);
    assert.equal(c.status, 'stopped');
    assert.deepEqual(states, ['stopped']);
    assert.ok(c.error instanceof SwitchboardError);
    assert.equal(c.error.closeCode, code);
    assert.equal(c.error.code, code === 4503 ? 'FORBIDDEN' : 'CONNECTION_LIMIT');
    assert.equal(c.error.retryable, false);
    await assert.rejects(c.publish('team:demo', 1), (e) => e.closeCode === code);
    c.close();
  });
}

test('an abnormal close reconnects with growing jittered backoff, reset after a stable period', async () => {
  const { c } = await connected();
  const delays = [];
  c.on('status', (s) => s.state === 'reconnecting' && delays.push(s.delayMs));
  for (let i = 0; i < 4; i++) {
    FakeSocket.last.serverClose(1006);
    const before = FakeSocket.instances.length;
    await clock.advance(delays[i] - 1);
    assert.equal(FakeSocket.instances.length, before, `no reconnect before ${delays[i]} ms`);
    await clock.advance(1);
    assert.equal(FakeSocket.instances.length, before + 1);
    FakeSocket.last.open(); // open, but the server never authenticates it
  }
  // random() = 0.999: each delay is just under 500 * 2^attempt.
  assert.deepEqual(delays, [499, 999, 1998, 3996]);
  FakeSocket.last.serverClose(1006);
  await clock.advance(10_000);
  FakeSocket.last.authenticate();
  await clock.advance(DEFAULTS.stableAfterMs);
  FakeSocket.last.serverClose(1011);
  assert.equal(delays.at(-1), 499, 'attempts restart after a stable authenticated period');
  c.close();
});

test('4001 fetches a new token, then reconnects at once', async () => {
  const { c, tokens } = await connected();
  FakeSocket.last.push({ type: 'error', code: 'TOKEN_EXPIRED', message: 'expired', retryable: false, action: 'REFRESH_TOKEN' });
  FakeSocket.last.serverClose(4001);
  await clock.advance(0);
  assert.deepEqual(tokens, ['connect', 'expired']);
  assert.equal(FakeSocket.instances.length, 2);
  FakeSocket.last.open();
  assert.equal(FakeSocket.last.lastSent('auth').token, 'tok-2');
  c.close();
});

test('a token source that keeps returning expired tokens stops after a few tries', async () => {
  const { c, tokens } = await connected();
  FakeSocket.last.serverClose(4001);
  for (let i = 0; i < 5 && c.status !== 'stopped'; i++) {
    await nextSocket();
    // The fresh token is expired on arrival: refused before authentication.
    FakeSocket.last.open();
    FakeSocket.last.serverClose(4001);
    await flush();
  }
  await clock.advance(60_000);
  assert.equal(c.status, 'stopped');
  assert.equal(tokens.length, 1 + DEFAULTS.maxTokenFailures);
  c.close();
});

test('1012 after `reconnect` reconnects within retry_after_ms', async () => {
  const { c } = await connected({ random: () => 0.5 });
  let status;
  c.on('status', (s) => (status = s));
  FakeSocket.last.push({ type: 'reconnect', reason: 'draining', retry_after_ms: 300 });
  FakeSocket.last.serverClose(1012);
  assert.equal(status.state, 'reconnecting');
  assert.equal(status.delayMs, 150);
  await clock.advance(150);
  assert.equal(FakeSocket.instances.length, 2);
  c.close();
});

test('4029 waits retry_after_ms before reconnecting', async () => {
  const { c } = await connected({ random: () => 0 });
  FakeSocket.last.push({ type: 'error', code: 'RATE_LIMITED', message: 'slow down', retryable: true, retry_after_ms: 2_000 });
  FakeSocket.last.serverClose(4029);
  await clock.advance(1_999);
  assert.equal(FakeSocket.instances.length, 1);
  await clock.advance(1);
  assert.equal(FakeSocket.instances.length, 2);
  c.close();
});

test('token_expiring refreshes; a failed refresh keeps the connection and retries', async () => {
  const { c, tokens } = await connected();
  const ws = FakeSocket.last;
  const errors = [];
  c.on('error', (e) => errors.push(e.code));
  ws.push({ type: 'token_expiring', expires_at: Math.floor(Date.now() / 1000) + 60 });
  await flush();
  assert.deepEqual(tokens, ['connect', 'refresh']);
  const r1 = ws.lastSent('refresh');
  assert.equal(r1.token, 'tok-2');
  ws.push({ type: 'error', id: r1.id, code: 'TOKEN_INVALID', message: 'bad', retryable: false });
  await flush();
  assert.deepEqual(errors, ['TOKEN_INVALID']);
  assert.equal(c.status, 'authenticated');
  await clock.advance(DEFAULTS.refreshRetryMs);
  const r2 = ws.lastSent('refresh');
  assert.notEqual(r2.id, r1.id);
  let refreshed;
  c.on('refreshed', (r) => (refreshed = r));
  ws.push({ type: 'refreshed', id: r2.id, expires_at: 12345 });
  await flush();
  assert.equal(refreshed.expiresAt, 12345);
  assert.equal(c.info.expiresAt, 12345);
  assert.equal(FakeSocket.instances.length, 1);
  c.close();
});

/** The server closes `ws` with `code`; the client's next socket, authenticated. */
async function reconnectAfter(ws, code) {
  ws.serverClose(code);
  await clock.advance(1_000);
  const next = FakeSocket.last;
  next.authenticate();
  await flush();
  return next;
}

/** A client subscribed to `team:demo` at `offset` of epoch `e1`, recording messages and resets. */
async function subscribedAt(offset) {
  const { c } = await connected();
  const got = [];
  const resets = [];
  const sub = c.subscribe('team:demo', { onMessage: (m) => got.push(m.offset), onReset: (r) => resets.push(r) });
  const ws = FakeSocket.last;
  ws.push({ type: 'subscribed', id: ws.lastSent('subscribe').id, channel: 'team:demo', offset, epoch: 'e1', recovered: false });
  return { c, sub, got, resets };
}

test('after a reconnect channels resubscribe with since; replays are de-duplicated; unrecovered is reported', async () => {
  const { c, sub, got, resets } = await subscribedAt(2);
  let ws = FakeSocket.last;
  assert.deepEqual(await sub.ready, { channel: 'team:demo', offset: 2, epoch: 'e1', recovered: false, resumed: false, readOffset: undefined });
  ws.push({ type: 'message', channel: 'team:demo', offset: 3, data: {}, from: 'bob' });
  ws = await reconnectAfter(ws, 1006);
  const resub = ws.lastSent('subscribe');
  assert.equal(resub.since, 3);
  assert.equal(resub.epoch, 'e1', 'the resume names the count its offset belongs to');
  // Replayed messages (one already seen), then `subscribed`, then a duplicate live one.
  for (const o of [3, 4, 5]) ws.push({ type: 'message', channel: 'team:demo', offset: o, data: {}, from: 'bob' });
  ws.push({ type: 'subscribed', id: resub.id, channel: 'team:demo', offset: 5, recovered: true });
  ws.push({ type: 'message', channel: 'team:demo', offset: 5, data: {}, from: 'bob' });
  ws.push({ type: 'message', channel: 'team:demo', offset: 6, data: {}, from: 'bob' });
  assert.deepEqual(got, [3, 4, 5, 6]);
  assert.equal(resets.length, 0);
  // History lost on the server: nothing replayed, the app is told to reload.
  ws = await reconnectAfter(ws, 1001);
  ws.push({ type: 'subscribed', id: ws.lastSent('subscribe').id, channel: 'team:demo', offset: 1, recovered: false });
  ws.push({ type: 'message', channel: 'team:demo', offset: 2, data: {}, from: 'bob' });
  assert.equal(resets.length, 1);
  assert.equal(resets[0].recovered, false);
  assert.equal(resets[0].lastOffset, 6);
  assert.deepEqual(got, [3, 4, 5, 6, 2], 'after an unrecovered resume the server offset is the truth');
  c.close();
});

test('a subscribed without id restarts the count: reset, then the new offsets are delivered', async () => {
  const { c, sub, got, resets } = await subscribedAt(7);
  let ws = FakeSocket.last;
  await sub.ready;
  ws.push({ type: 'message', channel: 'team:demo', offset: 8, data: {}, from: 'bob' });
  // The server's store restarted empty: offsets start over in epoch e2.
  ws.push({ type: 'subscribed', channel: 'team:demo', offset: 0, epoch: 'e2', recovered: false });
  ws.push({ type: 'message', channel: 'team:demo', offset: 1, data: {}, from: 'bob' });
  ws.push({ type: 'message', channel: 'team:demo', offset: 2, data: {}, from: 'bob' });
  assert.deepEqual(got, [8, 1, 2], 'the new count is not taken for replays');
  assert.equal(resets.length, 1);
  assert.deepEqual(
    [resets[0].recovered, resets[0].offset, resets[0].epoch, resets[0].lastOffset],
    [false, 0, 'e2', 8],
  );
  assert.equal(sub.offset, 0);
  // A resume after that names the new count.
  ws = await reconnectAfter(ws, 1006);
  const resub = ws.lastSent('subscribe');
  assert.deepEqual([resub.since, resub.epoch], [2, 'e2']);
  // An unsolicited `subscribed` for a channel this client does not hold is ignored.
  ws.push({ type: 'subscribed', channel: 'team:other', offset: 0, epoch: 'e3', recovered: false });
  assert.equal(resets.length, 1);
  c.close();
});

async function chatAck(c, ws, opts = { message: 'hi' }) {
  const stream = c.chat.send(opts);
  await flush();
  const send = ws.lastSent('chat.send');
  ws.push({ type: 'ack', id: send.id, session_id: 's1', request_id: `r${send.id}` });
  await stream.accepted;
  return stream;
}

async function collect(stream) {
  const chunks = [];
  for await (const ch of stream) chunks.push(ch);
  return chunks;
}

test('chat chunks are de-duplicated by seq and completed by chat.complete', async () => {
  const { c } = await connected();
  const ws = FakeSocket.last;
  const stream = await chatAck(c, ws);
  const all = collect(stream);
  const rid = stream.requestId;
  const chunk = (seq, content) => ws.push({ type: 'chat.chunk', session_id: 's1', request_id: rid, seq, content });
  chunk(0, 'Hel');
  chunk(1, 'lo');
  chunk(1, 'lo');
  chunk(0, 'Hel');
  chunk(3, '!'); // 2 was lost: held back until the gap is filled
  ws.push({ type: 'chat.complete', session_id: 's1', request_id: rid, content: 'Hello world!' });
  ws.push({ type: 'chat.complete', session_id: 's1', request_id: rid, content: 'Hello world!' });
  const chunks = await all;
  assert.deepEqual(chunks.map((x) => x.content), ['Hel', 'lo', ' world!']);
  assert.equal(chunks.map((x) => x.content).join(''), 'Hello world!');
  assert.ok(chunks.every((x) => !x.reset));
  assert.equal(await stream.done, 'Hello world!');
  // Iterating again after the end replays the same chunks.
  assert.deepEqual((await collect(stream)).map((x) => x.content), ['Hel', 'lo', ' world!']);
  c.close();
});

test('chat chunks that overtake their ack are kept and delivered', async () => {
  const { c } = await connected();
  const ws = FakeSocket.last;
  const stream = c.chat.send({ message: 'hi' });
  await flush();
  const send = ws.lastSent('chat.send');
  ws.push({ type: 'chat.chunk', session_id: 's1', request_id: 'early', seq: 0, content: 'A' });
  ws.push({ type: 'ack', id: send.id, session_id: 's1', request_id: 'early' });
  await flush();
  ws.push({ type: 'chat.complete', session_id: 's1', request_id: 'early', content: 'AB' });
  assert.deepEqual((await collect(stream)).map((x) => x.content), ['A', 'B']);
  c.close();
});

test('after a reconnect mid-stream the gap is filled from history', async () => {
  const { c } = await connected();
  let ws = FakeSocket.last;
  const stream = await chatAck(c, ws);
  const rid = stream.requestId;
  const all = collect(stream);
  ws.push({ type: 'chat.chunk', session_id: 's1', request_id: rid, seq: 0, content: 'one ' });
  ws = await reconnectAfter(ws, 1006);
  const h = ws.lastSent('history');
  assert.equal(h.session_id, 's1');
  ws.push({
    type: 'history', id: h.id, session_id: 's1', messages: [
      { role: 'user', content: 'hi', ts: 1, request_id: rid },
      { role: 'assistant', content: 'one two three', ts: 2, request_id: rid },
    ],
  });
  const chunks = await all;
  assert.deepEqual(chunks.map((x) => x.content), ['one ', 'two three']);
  assert.equal(await stream.done, 'one two three');
  assert.equal(stream.source, 'history');
  c.close();
});

test('a stream still running after the reconnect is completed by the live chat.complete', async () => {
  const { c } = await connected();
  let ws = FakeSocket.last;
  const stream = await chatAck(c, ws);
  const rid = stream.requestId;
  ws.push({ type: 'chat.chunk', session_id: 's1', request_id: rid, seq: 0, content: 'a' });
  ws = await reconnectAfter(ws, 1006);
  ws.push({ type: 'history', id: ws.lastSent('history').id, session_id: 's1', messages: [] });
  ws.push({ type: 'chat.chunk', session_id: 's1', request_id: rid, seq: 4, content: 'e' });
  await clock.advance(DEFAULTS.chatRecheckMs);
  assert.equal(ws.sentOf('history').length, 2, 'history is checked again while the stream runs');
  ws.push({ type: 'chat.complete', session_id: 's1', request_id: rid, content: 'abcde' });
  assert.deepEqual((await collect(stream)).map((x) => x.content), ['a', 'bcde']);
  await clock.advance(DEFAULTS.chatRecheckMs * 3);
  assert.equal(ws.sentOf('history').length, 2, 'no more checks after the end');
  c.close();
});

test('a stream silent on a live link is completed from history', async () => {
  const { c } = await connected();
  const ws = FakeSocket.last;
  const stream = await chatAck(c, ws);
  const rid = stream.requestId;
  ws.push({ type: 'chat.chunk', session_id: 's1', request_id: rid, seq: 0, content: 'a' });
  await clock.advance(DEFAULTS.chatSilenceMs - 100);
  assert.equal(ws.sentOf('history').length, 0, 'not before the silence is long enough');
  ws.push({ type: 'chat.chunk', session_id: 's1', request_id: rid, seq: 1, content: 'b' });
  await clock.advance(DEFAULTS.chatSilenceMs - 100);
  assert.equal(ws.sentOf('history').length, 0, 'each event restarts the wait');
  await clock.advance(200);
  const h = ws.lastSent('history');
  assert.equal(h.session_id, 's1');
  ws.push({ type: 'history', id: h.id, session_id: 's1', messages: [
    { role: 'user', content: 'hi', request_id: rid },
    { role: 'assistant', content: 'abc', request_id: rid },
  ] });
  assert.deepEqual((await collect(stream)).map((x) => x.content), ['a', 'b', 'c']);
  assert.equal(stream.source, 'history');
  c.close();
});

test('a repeated chat.complete after the stream ended is dropped, not reported as another tab', async () => {
  const { c } = await connected();
  const ws = FakeSocket.last;
  const others = [];
  c.on('chat', (f) => others.push(f));
  const stream = await chatAck(c, ws);
  const rid = stream.requestId;
  ws.push({ type: 'chat.complete', session_id: 's1', request_id: rid, content: 'done' });
  assert.equal(await stream.done, 'done');
  // The worker sends it again after a message-bus outage.
  ws.push({ type: 'chat.complete', session_id: 's1', request_id: rid, content: 'done' });
  ws.push({ type: 'chat.chunk', session_id: 's1', request_id: 'from-another-tab', seq: 0, content: 'x' });
  assert.deepEqual(others.map((f) => f.request_id), ['from-another-tab']);
  c.close();
});

test('a regenerated reply that differs is signalled with reset', async () => {
  const { c } = await connected();
  const ws = FakeSocket.last;
  const stream = await chatAck(c, ws);
  const rid = stream.requestId;
  ws.push({ type: 'chat.chunk', session_id: 's1', request_id: rid, seq: 0, content: 'Old' });
  ws.push({ type: 'chat.complete', session_id: 's1', request_id: rid, content: 'New text' });
  const chunks = await collect(stream);
  assert.equal(chunks.at(-1).reset, true);
  assert.equal(chunks.at(-1).text, 'New text');
  c.close();
});

test('chat.error fails the stream with a typed error', async () => {
  const { c } = await connected();
  const ws = FakeSocket.last;
  const stream = await chatAck(c, ws);
  ws.push({ type: 'chat.error', session_id: 's1', request_id: stream.requestId, code: 'UNAVAILABLE', message: 'llm down', retryable: true });
  await assert.rejects(stream.done, (e) => e instanceof SwitchboardError && e.code === 'UNAVAILABLE' && e.retryable);
  await assert.rejects(collect(stream), (e) => e.code === 'UNAVAILABLE');
  c.close();
});

test('requests time out, oversize frames are refused locally, bad input throws', async () => {
  const { c } = await connected();
  const timedOut = assert.rejects(c.publish('team:demo', { a: 1 }), (e) => e.code === 'TIMEOUT' && e.retryable === true);
  await clock.advance(DEFAULTS.requestTimeoutMs);
  await timedOut;
  await assert.rejects(c.publish('team:demo', 'x'.repeat(70_000)), (e) => e.code === 'TOO_LARGE');
  assert.throws(() => c.subscribe('nope'), (e) => e.code === 'BAD_REQUEST');
  assert.throws(() => c.chat.send({ message: '' }), (e) => e.code === 'BAD_REQUEST');
  assert.throws(() => connect({ url: 'http://x' , getToken: () => 't' }), (e) => e.code === 'BAD_REQUEST');
  c.close();
});

test('requests made while reconnecting wait and are sent after authentication', async () => {
  const { c } = await connected();
  FakeSocket.last.serverClose(1006);
  const p = c.publish('team:demo', 'later');
  await clock.advance(1_000);
  const ws = FakeSocket.last;
  ws.authenticate();
  await flush();
  const pub = ws.lastSent('publish');
  assert.equal(pub.data, 'later');
  ws.push({ type: 'ack', id: pub.id, offset: 9 });
  assert.deepEqual(await p, { offset: 9 });
  c.close();
});

test('a missing pong abandons the socket and reconnects', async () => {
  const { c } = await connected();
  await clock.advance(DEFAULTS.pingIntervalMs);
  assert.equal(FakeSocket.last.sentOf('ping').length, 1);
  await clock.advance(DEFAULTS.pongTimeoutMs);
  assert.equal(c.status, 'reconnecting');
  await clock.advance(1_000);
  assert.equal(FakeSocket.instances.length, 2);
  c.close();
});

test('backlog replays the recent past, then live messages, in offset order without duplicates', async () => {
  const { c } = await connected();
  const ws = FakeSocket.last;
  const got = [];
  const sub = c.subscribe('team:demo', { onMessage: (m) => got.push([m.offset, Boolean(m.backlog)]) }, { backlog: 3 });
  const first = ws.lastSent('subscribe');
  assert.equal(first.since, undefined);
  ws.push({ type: 'subscribed', id: first.id, channel: 'team:demo', offset: 10, recovered: false });
  const second = ws.lastSent('subscribe');
  assert.equal(second.since, 7);
  // A live message overtakes the replay, then the replay (8..11), then `subscribed`.
  ws.push({ type: 'message', channel: 'team:demo', offset: 11, data: {}, from: 'bob' });
  for (const o of [8, 9, 10, 11]) ws.push({ type: 'message', channel: 'team:demo', offset: o, data: {}, from: 'bob' });
  assert.deepEqual(got, [], 'held until the replay ends');
  ws.push({ type: 'subscribed', id: second.id, channel: 'team:demo', offset: 11, recovered: true });
  ws.push({ type: 'message', channel: 'team:demo', offset: 12, data: {}, from: 'bob' });
  assert.deepEqual(got, [[8, true], [9, true], [10, true], [11, false], [12, false]]);
  const info = await sub.ready;
  assert.equal(info.backlog, 3);
  c.close();
});

test('closing while getToken is pending never opens a socket', async () => {
  let release;
  const c = connect({
    url: freshUrl(), WebSocket: FakeSocket, getToken: () => new Promise((r) => (release = r)),
    setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout,
  });
  await flush();
  c.close();
  release('late-token');
  await clock.advance(60_000);
  assert.equal(FakeSocket.instances.length, 0);
  assert.equal(c.status, 'closed');
});

test('a getToken that refuses for good stops the client; reconnect() starts it again', async () => {
  let refuse = true;
  const c = connect({
    url: freshUrl(), WebSocket: FakeSocket,
    getToken: async () => {
      if (refuse) throw new SwitchboardError('SIGNED_OUT', 'sign in again', { retryable: false });
      return 'fresh';
    },
    setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout,
  });
  await clock.advance(60_000);
  assert.equal(c.status, 'stopped');
  assert.equal(c.error.code, 'SIGNED_OUT');
  assert.equal(FakeSocket.instances.length, 0);
  refuse = false;
  c.reconnect();
  await flush();
  FakeSocket.last.authenticate();
  await flush();
  assert.equal(c.status, 'authenticated');
  assert.equal(FakeSocket.last.lastSent('auth').token, 'fresh');
  c.close();
});

test('a getToken that fails for a while is retried with backoff', async () => {
  let failures = 2;
  const c = connect({
    url: freshUrl(), WebSocket: FakeSocket, random: () => 0.999,
    getToken: async () => {
      if (failures-- > 0) throw new Error('backend down');
      return 'ok';
    },
    setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout,
  });
  const states = [];
  c.on('status', (s) => states.push(`${s.state}${s.delayMs === undefined ? '' : `:${s.delayMs}`}`));
  await clock.advance(2_000);
  assert.equal(FakeSocket.instances.length, 1);
  assert.deepEqual(states.slice(0, 4), ['reconnecting:499', 'connecting', 'reconnecting:999', 'connecting']);
  c.close();
});
