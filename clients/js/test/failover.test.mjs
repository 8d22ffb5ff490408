// A gateway dies (kill -9) in the middle of a streamed chat reply: the client lands on
// the other gateway through HAProxy and the reply is still complete, in order and
// exactly once. Two paths: the client is back while the reply still streams (the gap
// is filled by chat.complete), and the client is back only after the reply was
// recorded (the gap is filled from history). The killed gateway is brought back with
// `scripts/cluster restart <node>` each time. Runs alone: it disturbs every
// connection on that gateway.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from '../switchboard.js';
import { WS_URL, api, clusterScript, componentPid, login, nextEvent, spySocket, uniqueUser, waitFor } from './cluster.mjs';

// Chunks seen before the kill: enough to prove the stream was under way.
const CHUNKS_BEFORE_KILL = 3;
// A long reply, so a real model is still streaming when the gateway dies.
const PROMPT = 'Count from one to forty in words, separated by commas.';
// Backoff for the "late" client: it must not come back on its own before the test
// has seen the reply recorded in history.
const LATE_BACKOFF_MS = 600_000;

let killed = null;
after(async () => {
  if (killed) await clusterScript(['restart', killed]);
});

async function restore() {
  const node = killed;
  await clusterScript(['restart', node]);
  killed = null;
  await waitFor(async () => {
    const r = await api('GET', '/v1/nodes');
    return r.status === 200 && r.json.nodes.some((n) => n.node === node);
  }, 30_000, `${node} listed in /v1/nodes again`);
}

/**
 * Streams a reply and kills the gateway of the connection after a few chunks. With
 * `late`, the client may reconnect only once a second connection of the same user
 * sees the reply recorded in history.
 */
async function killMidStream({ late }) {
  const user = uniqueUser(late ? 'failover-late' : 'failover');
  const spy = spySocket();
  const token = async () => (await login(user)).token;
  const c = connect({
    url: WS_URL, WebSocket: spy.WebSocket, shared: false, getToken: token,
    ...(late ? { backoff: { baseMs: LATE_BACKOFF_MS, capMs: LATE_BACKOFF_MS }, random: () => 1 } : {}),
  });
  const watcher = late ? connect({ url: WS_URL, WebSocket: spySocket().WebSocket, shared: false, getToken: token }) : null;
  try {
    const info = await c.ready({ timeoutMs: 15_000 });
    const node = info.node;
    assert.match(node, /^gw[12]$/);
    const stream = c.chat.send({ message: PROMPT });
    const chunks = [];
    let killedAt = null;
    const moved = nextEvent(c, 'authenticated', (i) => i.node !== node, 120_000).then((i) => ({ ...i, at: Date.now() }));
    const away = nextEvent(c, 'disconnected', () => true, 120_000);
    const consumed = (async () => {
      for await (const ch of stream) {
        chunks.push(ch);
        if (killedAt === null && chunks.length === CHUNKS_BEFORE_KILL) {
          killed = node;
          killedAt = Date.now();
          process.kill(componentPid(node), 'SIGKILL');
        }
      }
    })();
    if (late) {
      await away;
      await watcher.ready({ timeoutMs: 30_000 });
      // The watcher may have been on the killed gateway too: a failed look is retried.
      const recorded = async () => (await watcher.chat.history(stream.sessionId))
        .some((m) => m.role === 'assistant' && m.request_id === stream.requestId);
      await waitFor(() => recorded().catch(() => false), 120_000, 'the reply recorded in history');
      assert.equal(c.status, 'reconnecting', 'still away while the reply completed');
      c.reconnect();
    }
    await consumed;
    const text = await stream.done;
    const landed = await moved;
    assert.ok(killedAt !== null, `the stream had at least ${CHUNKS_BEFORE_KILL} chunks before its end`);
    assert.notEqual(landed.node, node, 'reconnected to the other gateway');
    assert.ok(text.length > 0, 'a non-empty reply');
    assert.equal(chunks.map((x) => x.content).join(''), text, 'the chunks add up to the reply exactly once, in order');
    assert.ok(chunks.every((x) => !x.reset), 'no regeneration was needed (the worker did not die)');
    const seqs = chunks.filter((x) => x.seq !== null).map((x) => x.seq);
    assert.deepEqual(seqs, seqs.map((_, i) => i), 'streamed chunks in seq order, none repeated');
    const history = await c.chat.history(stream.sessionId);
    const entry = history.find((m) => m.role === 'assistant' && m.request_id === stream.requestId);
    assert.equal(entry?.content, text, 'the reply equals the history entry');
    if (late) assert.equal(stream.source, 'history', 'the gap was filled from history');
    const received = spy.log.received.filter((f) => f.type === 'chat.chunk' && f.request_id === stream.requestId).length;
    console.log(`# ${late ? 'late' : 'prompt'} reconnect: killed ${node} after ${CHUNKS_BEFORE_KILL} chunks, on ${landed.node} `
      + `${landed.at - killedAt} ms later; ${received} chunk frames seen, ${chunks.length} chunks yielded, `
      + `final text from ${stream.source}, ${text.length} chars`);
  } finally {
    c.close();
    watcher?.close();
  }
}

test('a gateway killed mid-stream, the client back at once: the reply completes', { timeout: 240_000 }, async () => {
  await killMidStream({ late: false });
  await restore();
});

test('a gateway killed mid-stream, the client back after the reply ended: history fills the gap', { timeout: 240_000 }, async () => {
  await killMidStream({ late: true });
  await restore();
});
