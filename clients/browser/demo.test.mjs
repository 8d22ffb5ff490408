// The demo page in headless Chromium (playwright-core, /usr/bin/chromium): sign in,
// see teams and tasks, watch a chat reply stream in and grow, post to team:demo and
// see another user's message arrive. Saves $SB_CLUSTER_RUN/artifacts/demo.png.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { connect } from '../js/switchboard.js';
import { BASE_URL, RUN, WS_URL, login, uniqueUser } from '../js/test/cluster.mjs';

const CHROMIUM = '/usr/bin/chromium';
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];
// A real model on two shared cores may need a while for a whole reply.
const CHAT_TIMEOUT_MS = 120_000;
const STEP_TIMEOUT_MS = 15_000;

test('the demo page signs in, streams a chat reply and shows team activity', { timeout: 240_000 }, async () => {
  const profile = mkdtempSync(path.join(tmpdir(), 'sb-chromium-'));
  const artifacts = path.join(RUN, 'artifacts');
  mkdirSync(artifacts, { recursive: true });
  const user = uniqueUser('browser');
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ARGS,
    viewport: { width: 1360, height: 820 },
  });
  const problems = [];
  let other = null;
  try {
    const page = await context.newPage();
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('console', (m) => m.type() === 'error' && problems.push(`console: ${m.text()}`));
    const res = await page.goto(`${BASE_URL}/`);
    assert.equal(res.status(), 200);
    assert.equal(await page.title(), 'Switchboard demo');

    await page.screenshot({ path: path.join(artifacts, 'login.png') });
    await page.fill('#login-name', user);
    await page.click('#login-submit');
    await page.waitForSelector('#status[data-state="authenticated"]', { timeout: STEP_TIMEOUT_MS });
    assert.match(await page.textContent('#status-text'), /Connected · gw[12]/);
    await page.waitForSelector('#teams li', { timeout: STEP_TIMEOUT_MS });
    const teams = await page.locator('#teams li').allTextContents();
    assert.ok(teams.length >= 2, `teams shown: ${teams}`);
    assert.ok(teams.some((t) => t.includes('team:demo')), 'the demo team is marked with its channel');
    const tasks = await page.locator('#tasks li').allTextContents();
    assert.ok(tasks.length >= 1 && !tasks[0].includes('No tasks'), `tasks shown: ${tasks}`);

    // Record the reply bubble's length at every change, to see it grow.
    await page.evaluate(() => {
      window.replyLengths = [];
      new MutationObserver(() => {
        const b = [...document.querySelectorAll('.msg.assistant .bubble')].at(-1);
        if (b && window.replyLengths.at(-1) !== b.textContent.length) window.replyLengths.push(b.textContent.length);
      }).observe(document.getElementById('chat-log'), { subtree: true, childList: true, characterData: true });
    });
    await page.fill('#chat-input', 'Name three colours of the rainbow.');
    await page.press('#chat-input', 'Enter');
    await page.waitForSelector('.msg.user .bubble', { timeout: STEP_TIMEOUT_MS });
    await page.waitForSelector('#chat-cancel:not([hidden])', { timeout: STEP_TIMEOUT_MS });
    await page.waitForFunction(() => document.querySelector('.msg.assistant .bubble')?.textContent.length > 0, null, { timeout: CHAT_TIMEOUT_MS });
    await page.waitForSelector('.msg.assistant:not(.streaming)', { timeout: CHAT_TIMEOUT_MS });
    const reply = await page.textContent('.msg.assistant .bubble');
    const lengths = await page.evaluate(() => window.replyLengths);
    assert.ok(reply.trim().length > 0, 'a reply is shown');
    assert.equal(await page.locator('.msg.assistant.failed').count(), 0, `the reply did not fail: ${reply}`);
    assert.ok(lengths.filter((n) => n > 0).length >= 2, `the reply grew while streaming: ${lengths}`);
    assert.deepEqual(lengths, [...lengths].sort((a, b) => a - b), 'it only grew');
    assert.ok(await page.isVisible('#chat-send'), 'the send button is back');

    // Post to team:demo from the page, and receive another user's message.
    const mine = `hello from ${user}`;
    await page.fill('#feed-input', mine);
    await page.click('#feed-send');
    await page.waitForSelector(`.feed-item.mine .text >> text=${mine}`, { timeout: STEP_TIMEOUT_MS });
    const otherUser = uniqueUser('teammate');
    other = connect({ url: WS_URL, shared: false, getToken: async () => (await login(otherUser)).token });
    await other.ready({ timeoutMs: STEP_TIMEOUT_MS });
    await other.subscribe('team:demo').ready;
    await page.waitForSelector(`#presence li >> text=${otherUser}`, { timeout: STEP_TIMEOUT_MS });
    other.typing('team:demo');
    await page.waitForSelector(`#typing >> text=${otherUser} is typing`, { timeout: STEP_TIMEOUT_MS });
    const theirs = `hi ${user}, welcome to the team`;
    await other.publish('team:demo', { text: theirs, ts: Date.now() });
    await page.waitForSelector(`.feed-item .text >> text=${theirs}`, { timeout: STEP_TIMEOUT_MS });

    await page.screenshot({ path: path.join(artifacts, 'demo.png') });
    await page.setViewportSize({ width: 390, height: 844 });
    await page.screenshot({ path: path.join(artifacts, 'demo-mobile.png'), fullPage: true });
    assert.deepEqual(problems, [], 'no errors in the page');
  } finally {
    other?.close();
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
});
