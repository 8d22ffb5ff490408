// The client against a live cluster through HAProxy (scripts/cluster up --detach):
// sharing, stop codes, token expiry, backoff timing, resume with `since`, channel
// events and chunk de-duplication. The gateway-kill gap fill is in failover.test.mjs.
import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import { connect, SUBPROTOCOL } from '../switchboard.js';
import {
  WS_URL, api, login, mintToken, nextEvent, sleep, spySocket, uniqueUser, waitFor,
} from './cluster.mjs';

// How long a stopped client is watched for a forbidden retry: longer than the
// first backoff steps (0.5 s, 1 s, 2 s) together.
const NO_RETRY_WATCH_MS = 4_000;

const open = new Set();
after(() => {
  for (const c of open) c.close();
});

/** A private (unshared) client for `user`, signing in through the stand-in backend. */
function client(user, { spy = spySocket(), getToken, ...opts } = {}) {
  const calls = [];
  const c = connect({
    url: WS_URL,
    WebSocket: spy.WebSocket,
    shared: false,
    getToken: async (req) => {
      calls.push(req.reason);
      return getToken ? getToken(req) : (await login(user)).token;
    },
    ...opts,
  });
  open.add(c);
  return { c, spy, calls, close: () => { c.close(); open.delete(c); } };
}

describe('live cluster', { concurrency: true }, () => {
  test('authenticates with the first frame and gets teams and tasks', async () => {
    const user = uniqueUser('auth');
    const { c, spy, close } = client(user);
    const info = await c.ready({ timeoutMs: 15_000 });
    assert.equal(info.user.id, user);
    assert.ok(['gw1', 'gw2'].includes(info.node), `node ${info.node}`);
    assert.ok(info.teams.some((t) => t.id === 'demo'), 'every user is in team demo');
    assert.ok(info.tasks.length > 0, 'demo users have tasks');
    assert.ok(info.expiresAt > Date.now() / 1000);
    const ws = spy.log.opened[0];
    assert.deepEqual(ws.protocols, [SUBPROTOCOL]);
    assert.equal(ws.socket.protocol, SUBPROTOCOL);
    assert.ok(!ws.url.includes('token'), 'no token in the URL');
    assert.equal(spy.log.sent[0].type, 'auth');
    close();
  });

  test('many subscribers share one connection per page', async () => {
    const user = uniqueUser('share');
    const spy = spySocket();
    let tokens = 0;
    const opts = { url: WS_URL, WebSocket: spy.WebSocket, getToken: async () => { tokens += 1; return (await login(user)).token; } };
    const handles = Array.from({ length: 5 }, () => connect(opts));
    handles.forEach((h) => open.add(h));
    await Promise.all(handles.map((h) => h.ready({ timeoutMs: 15_000 })));
    const got = handles.map(() => []);
    const subs = handles.map((h, i) => h.subscribe('team:demo', { onMessage: (m) => got[i].push(m.offset) }));
    await Promise.all(subs.map((s) => s.ready));
    assert.equal(spy.log.opened.length, 1, 'one WebSocket for five handles');
    assert.equal(tokens, 1);
    assert.equal(spy.log.sent.filter((f) => f.type === 'subscribe').length, 1, 'one subscribe frame');
    const conns = await api('GET', `/v1/users/${user}/connections`);
    assert.equal(conns.status, 200);
    assert.equal(conns.json.connections.length, 1, 'the cluster sees one connection');
    const other = client(uniqueUser('share-pub'));
    await other.c.ready({ timeoutMs: 15_000 });
    const { offset } = await other.c.publish('team:demo', { text: 'to all five' });
    await waitFor(() => got.every((g) => g.includes(offset)), 5_000, 'every subscriber got the message');
    for (const h of handles.slice(0, 4)) h.close();
    assert.equal(spy.log.opened[0].socket.readyState, 1, 'still open while a handle remains');
    handles[4].close();
    await waitFor(() => spy.log.opened[0].socket.readyState === 3, 5_000, 'socket closed with the last handle');
    other.close();
  });

  test('a kick (4503) stops the client: no retry', async () => {
    const user = uniqueUser('kick');
    const { c, spy, calls, close } = client(user);
    await c.ready({ timeoutMs: 15_000 });
    const stopped = nextEvent(c, 'status', (s) => s.state === 'stopped');
    const r = await api('POST', '/v1/disconnect', { user_id: user });
    assert.equal(r.status, 200, r.text);
    const s = await stopped;
    assert.equal(s.error.closeCode, 4503);
    assert.equal(s.error.code, 'FORBIDDEN');
    assert.equal(s.error.retryable, false);
    await sleep(NO_RETRY_WATCH_MS);
    assert.equal(spy.log.opened.length, 1, 'no new connection after 4503');
    assert.equal(calls.length, 1, 'getToken not called again');
    assert.equal(c.status, 'stopped');
    await assert.rejects(c.publish('team:demo', 1), (e) => e.closeCode === 4503);
    close();
  });

  test('the per-user limit (4509) stops the extra client: no retry', async () => {
    const user = uniqueUser('limit');
    const { token } = await login(user);
    const ten = Array.from({ length: 10 }, () => client(user, { getToken: () => token }));
    await Promise.all(ten.map(({ c }) => c.ready({ timeoutMs: 20_000 })));
    const extra = client(user, { getToken: () => token });
    const s = await nextEvent(extra.c, 'status', (st) => st.state === 'stopped', 20_000);
    assert.equal(s.error.closeCode, 4509);
    assert.equal(s.error.code, 'CONNECTION_LIMIT');
    await sleep(NO_RETRY_WATCH_MS);
    assert.equal(extra.spy.log.opened.length, 1, 'no retry after 4509');
    assert.equal(extra.c.status, 'stopped');
    for (const t of ten) assert.equal(t.c.status, 'authenticated', 'the ten stay connected');
    for (const t of [...ten, extra]) t.close();
  });

  test('an expired token (4001) is replaced through getToken, then the client reconnects', async () => {
    const user = uniqueUser('expiry');
    let phase = 'short';
    const events = [];
    const { c, spy, calls, close } = client(user, {
      getToken: async (req) => {
        events.push(`getToken:${req.reason}`);
        if (phase === 'short') {
          phase = 'refresh-fails';
          return mintToken(user, 2);
        }
        if (phase === 'refresh-fails') throw new Error('token service unreachable (test)');
        return (await login(user)).token;
      },
    });
    c.on('token_expiring', () => events.push('token_expiring'));
    c.on('error', (e) => events.push(`error:${e.code}`));
    c.on('disconnected', (d) => {
      events.push(`closed:${d.closeCode}`);
      if (d.closeCode === 4001) phase = 'good';
    });
    const first = await c.ready({ timeoutMs: 15_000 });
    // The server closes 4001 at exp + leeway (5 s); refreshes fail until then.
    const d = await nextEvent(c, 'disconnected', () => true, 20_000);
    assert.equal(d.closeCode, 4001);
    assert.equal(d.error.code, 'TOKEN_EXPIRED');
    const again = await nextEvent(c, 'authenticated', () => true, 15_000);
    assert.ok(again.expiresAt > first.expiresAt + 60, 'a new, longer token');
    assert.equal(spy.log.opened.length, 2, 'exactly one reconnect');
    assert.ok(events.includes('token_expiring'), events.join(' '));
    assert.ok(events.includes('error:TOKEN_UNAVAILABLE'), `a failed refresh is reported: ${events.join(' ')}`);
    const closeAt = events.indexOf('closed:4001');
    assert.equal(events[closeAt + 1], 'getToken:expired', `a token is fetched right after 4001: ${events.join(' ')}`);
    assert.deepEqual(calls.slice(0, 1), ['connect']);
    close();
  });

  test('token_expiring is answered with a refresh on the same connection', async () => {
    const user = uniqueUser('refresh');
    let n = 0;
    const { c, spy, close } = client(user, {
      getToken: async () => {
        n += 1;
        return n === 1 ? mintToken(user, 3) : (await login(user)).token;
      },
    });
    const first = await c.ready({ timeoutMs: 15_000 });
    const r = await nextEvent(c, 'refreshed', () => true, 10_000);
    assert.ok(r.expiresAt > first.expiresAt + 60);
    // Past the short token's exp + leeway: still the same connection.
    await sleep(9_000);
    assert.equal(c.status, 'authenticated');
    assert.equal(spy.log.opened.length, 1);
    assert.equal(c.info.connId, first.connId);
    close();
  });

  test('reconnects with jittered backoff after a 4000 kick, at once after a 1012 kick', async () => {
    const user = uniqueUser('backoff');
    // random() = 0.9: the delays are 0.9 x 500 ms, then 0.9 x 1000 ms.
    const { c, spy, close } = client(user, { random: () => 0.9 });
    const info = await c.ready({ timeoutMs: 15_000 });
    const gaps = [];
    let conn = info.connId;
    for (const code of [4000, 4000, 1012]) {
      const closed = nextEvent(c, 'disconnected');
      const back = nextEvent(c, 'authenticated', () => true, 15_000);
      const r = await api('POST', '/v1/disconnect', { conn_id: conn, code });
      assert.equal(r.status, 200, r.text);
      const d = await closed;
      const closedAt = Date.now();
      assert.equal(d.closeCode, code);
      const again = await back;
      gaps.push(spy.log.opened.at(-1).at - closedAt);
      conn = again.connId;
    }
    assert.ok(gaps[0] >= 400 && gaps[0] < 1_200, `first backoff ~450 ms, got ${gaps[0]}`);
    assert.ok(gaps[1] >= 850 && gaps[1] < 1_700, `second backoff ~900 ms, got ${gaps[1]}`);
    // 1012 without a `reconnect` frame: jitter within drainJitterMs (0.9 x 1000 ms).
    assert.ok(gaps[2] < 1_400, `1012 reconnects at once, got ${gaps[2]}`);
    assert.equal(spy.log.opened.length, 4);
    close();
  });

  test('after a reconnect the channel resumes with since: missed messages arrive, once, in order', async () => {
    const reader = client(uniqueUser('resume'), { backoff: { baseMs: 3_000 }, random: () => 0.9 });
    const writer = client(uniqueUser('resume-w'));
    const info = await reader.c.ready({ timeoutMs: 15_000 });
    await writer.c.ready({ timeoutMs: 15_000 });
    const got = [];
    const resumes = [];
    const resets = [];
    const sub = reader.c.subscribe('team:demo', {
      onMessage: (m) => got.push(m),
      onSubscribed: (s) => s.resumed && resumes.push(s),
      onReset: (r) => resets.push(r),
    });
    await sub.ready;
    const before = (await writer.c.publish('team:demo', { n: 0 })).offset;
    await waitFor(() => got.some((m) => m.offset === before), 5_000, 'the first message');
    const closed = nextEvent(reader.c, 'disconnected');
    await api('POST', '/v1/disconnect', { conn_id: info.connId, code: 4000 });
    await closed;
    // The reader waits ~2.7 s before reconnecting: these land while it is away.
    const missed = [];
    for (let n = 1; n <= 3; n++) missed.push((await writer.c.publish('team:demo', { n })).offset);
    await waitFor(() => resumes.length === 1, 15_000, 'the resubscribe');
    const live = (await writer.c.publish('team:demo', { n: 4 })).offset;
    await waitFor(() => got.some((m) => m.offset === live), 5_000, 'the live message after the resume');
    const resub = reader.spy.log.sent.filter((f) => f.type === 'subscribe').at(-1);
    assert.ok(resub.since >= before, `resubscribe carries since (${resub.since})`);
    assert.equal(resumes[0].recovered, true);
    assert.equal(resets.length, 0);
    const offsets = got.map((m) => m.offset);
    for (const o of [...missed, live]) assert.ok(offsets.includes(o), `offset ${o} delivered`);
    assert.deepEqual(offsets, [...offsets].sort((a, b) => a - b), 'in offset order');
    assert.equal(new Set(offsets).size, offsets.length, 'no duplicates');
    reader.close();
    writer.close();
  });

  test('presence, join, typing and read between two users', async () => {
    const a = client(uniqueUser('pa'));
    const b = client(uniqueUser('pb'));
    const ua = (await a.c.ready({ timeoutMs: 15_000 })).user.id;
    const ub = (await b.c.ready({ timeoutMs: 15_000 })).user.id;
    const joins = [];
    const typing = [];
    await a.c.subscribe('team:demo', { onJoin: (j) => joins.push(j.user), onTyping: (t) => typing.push(t.user) }).ready;
    await b.c.subscribe('team:demo').ready;
    await waitFor(() => joins.includes(ub), 5_000, `join of ${ub}`);
    const users = await a.c.presence('team:demo');
    for (const u of [ua, ub]) assert.ok(users.some((p) => p.user_id === u && p.connections >= 1), `${u} present`);
    assert.equal(b.c.typing('team:demo'), true);
    await waitFor(() => typing.includes(ub), 5_000, 'typing event');
    const { offset } = await b.c.publish('team:demo', { text: 'read me' });
    assert.deepEqual(await a.c.read('team:demo', offset), { offset });
    await assert.rejects(a.c.publish(`user:${ub}`, 'x'), (e) => e.code === 'FORBIDDEN' && e.retryable === false);
    assert.equal(a.c.status, 'authenticated', 'a refused publish keeps the connection');
    a.close();
    b.close();
  });

  test('duplicated chat chunks are dropped: the reply is exact and in order', async () => {
    // The transport delivers every chat frame twice, like a redelivery would.
    const spy = spySocket({ duplicate: (f) => f.type === 'chat.chunk' || f.type === 'chat.complete' });
    const { c, close } = client(uniqueUser('dedup'), { spy });
    await c.ready({ timeoutMs: 15_000 });
    const stream = c.chat.send({ message: 'Say hello in five words.' });
    const chunks = [];
    for await (const ch of stream) chunks.push(ch);
    const text = await stream.done;
    assert.ok(text.length > 0, 'a non-empty reply');
    const raw = spy.log.received.filter((f) => f.type === 'chat.chunk' && f.request_id === stream.requestId);
    assert.ok(raw.length >= 2, 'the reply was streamed');
    assert.equal(chunks.map((x) => x.content).join(''), text, 'chunks add up to chat.complete exactly once');
    const seqs = chunks.filter((x) => x.seq !== null).map((x) => x.seq);
    assert.deepEqual(seqs, seqs.map((_, i) => i), 'seq 0, 1, 2, ... without repeats');
    assert.ok(chunks.every((x) => !x.reset));
    const history = await c.chat.history(stream.sessionId);
    assert.ok(history.some((m) => m.role === 'assistant' && m.request_id === stream.requestId && m.content === text));
    close();
  });
});
