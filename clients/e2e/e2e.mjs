#!/usr/bin/env node
// End-to-end check through HAProxy: sign in -> connect -> authenticated with teams and
// tasks -> a chat reply streamed by the model -> a channel message between two users
// on team:demo -> history holds the exchange. Prints a summary with timings; exits
// non-zero on the first failure. Needs a running cluster (scripts/cluster up --detach).
// Node 20: run with --experimental-websocket.
import assert from 'node:assert/strict';
import { connect } from '../js/switchboard.js';
import { BASE_URL, WS_URL, login, uniqueUser } from '../js/test/cluster.mjs';

// A real model on two shared cores can take a while for a full reply.
const CHAT_TIMEOUT_MS = 120_000;
const STEP_TIMEOUT_MS = 15_000;

const rows = [];
const ms = (t0) => Date.now() - t0;
const fmt = (v) => (v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${v} ms`);
function row(step, took, note = '') {
  rows.push([step, took === null ? '' : fmt(took), note]);
}

function within(promise, limitMs, what) {
  let t;
  return Promise.race([
    promise,
    new Promise((_, reject) => (t = setTimeout(() => reject(new Error(`${what}: nothing within ${limitMs} ms`)), limitMs))),
  ]).finally(() => clearTimeout(t));
}

async function main() {
  const alice = uniqueUser('alice');
  const bob = uniqueUser('bob');
  let t0 = Date.now();
  await login(alice);
  row('login (POST /api/auth/login)', ms(t0));

  const opts = (user) => ({ url: WS_URL, shared: false, getToken: async () => (await login(user)).token });
  const a = connect(opts(alice));
  const b = connect(opts(bob));
  try {
    t0 = Date.now();
    const info = await a.ready({ timeoutMs: STEP_TIMEOUT_MS });
    row('connect + authenticated', ms(t0), `node ${info.node}, degraded ${info.degraded}`);
    assert.equal(info.user.id, alice);
    assert.ok(info.teams.some((t) => t.id === 'demo'), `teams include demo: ${JSON.stringify(info.teams)}`);
    assert.ok(info.tasks.length > 0, 'tasks are listed');
    assert.ok(info.tasks.every((t) => typeof t.id === 'string'), 'tasks have ids');
    row('teams / tasks', null, `${info.teams.map((t) => t.id).join(', ')} / ${info.tasks.length} tasks`);
    await b.ready({ timeoutMs: STEP_TIMEOUT_MS });

    // Chat: streamed, in order, and equal to chat.complete.
    const question = 'In one sentence, what is a WebSocket?';
    t0 = Date.now();
    const stream = a.chat.send({ message: question });
    let firstChunk = null;
    const chunks = [];
    await within((async () => {
      for await (const ch of stream) {
        if (firstChunk === null) firstChunk = ms(t0);
        chunks.push(ch);
      }
    })(), CHAT_TIMEOUT_MS, 'chat reply');
    const reply = await stream.done;
    const total = ms(t0);
    assert.ok(reply.trim().length > 0, 'the model replied with text');
    assert.ok(chunks.length >= 2, `the reply was streamed (${chunks.length} chunks)`);
    assert.equal(chunks.map((c) => c.content).join(''), reply, 'the chunks add up to chat.complete');
    const seqs = chunks.filter((c) => c.seq !== null).map((c) => c.seq);
    assert.deepEqual(seqs, seqs.map((_, i) => i), 'chunks arrive in seq order');
    row('chat: first chunk', firstChunk);
    row('chat: complete', total, `${chunks.length} chunks, ${reply.length} chars`);

    // Channel: alice -> bob on team:demo.
    const nonce = `${Date.now()}-${Math.random()}`;
    let bobSub;
    const got = new Promise((resolve) => {
      bobSub = b.subscribe('team:demo', { onMessage: (m) => m.data?.nonce === nonce && resolve(m) });
    });
    await within(bobSub.ready, STEP_TIMEOUT_MS, 'subscribe');
    t0 = Date.now();
    const { offset } = await a.publish('team:demo', { text: `hello from ${alice}`, nonce });
    const m = await within(got, STEP_TIMEOUT_MS, 'channel message');
    assert.equal(m.offset, offset);
    assert.equal(m.from, alice);
    row('channel: publish -> delivered', ms(t0), `${alice} -> ${bob} on team:demo, offset ${offset}`);

    // History holds the exchange.
    t0 = Date.now();
    const history = await a.chat.history(stream.sessionId);
    const asked = history.find((h) => h.role === 'user' && h.content === question);
    const answered = history.find((h) => h.role === 'assistant' && h.request_id === stream.requestId);
    assert.ok(asked, 'history has the question');
    assert.equal(answered?.content, reply, 'history has the reply');
    row('history', ms(t0), `${history.length} messages`);
  } finally {
    a.close();
    b.close();
  }
  const w = Math.max(...rows.map((r) => r[0].length));
  console.log(`e2e OK against ${BASE_URL}`);
  for (const [step, took, note] of rows) console.log(`  ${step.padEnd(w)}  ${took.padStart(9)}  ${note}`);
}

main().catch((e) => {
  console.error(`e2e FAILED: ${e.stack ?? e}`);
  process.exit(1);
});
