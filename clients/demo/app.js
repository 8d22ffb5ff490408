//! The demo page: sign in through the stand-in backend, then chat with the assistant,
//! see teams and tasks, and talk on team:demo, all through one Switchboard client.

import { connect } from '/js/switchboard.js';

const CHANNEL = 'team:demo';
// How long a "is typing" notice stays without a new typing event (the sender repeats
// it every TYPING_EVERY_MS while typing).
const TYPING_SHOW_MS = 3_500;
const TYPING_EVERY_MS = 2_000;
// How many past messages of team:demo to show when the page opens (the server keeps
// the last 100 of a channel).
const FEED_BACKLOG = 50;
const SESSION_KEY = 'switchboard-demo-session';
const USER_KEY = 'switchboard-demo-user';

const $ = (id) => document.getElementById(id);
const els = {
  loginView: $('login-view'), appView: $('app-view'), loginForm: $('login-form'), loginName: $('login-name'),
  loginSubmit: $('login-submit'), loginError: $('login-error'), status: $('status'), statusText: $('status-text'),
  statusRetry: $('status-retry'), me: $('me'), meName: $('me-name'), meAvatar: $('me-avatar'), logout: $('logout'),
  teams: $('teams'), tasks: $('tasks'), presence: $('presence'), chatLog: $('chat-log'), chatEmpty: $('chat-empty'),
  chatForm: $('chat-form'), chatInput: $('chat-input'), chatSend: $('chat-send'), chatCancel: $('chat-cancel'),
  chatNew: $('chat-new'), feedLog: $('feed-log'), feedEmpty: $('feed-empty'), feedForm: $('feed-form'),
  feedInput: $('feed-input'), typing: $('typing'),
};

let client = null;
let user = null;
let pendingToken = null;
let feedSub = null;
let activeStream = null;
let lastTypingSent = 0;
const typers = new Map();
const unbind = [];

// --- sign-in ---

async function login(name) {
  const res = await fetch('/api/auth/login', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ user: name }),
    signal: AbortSignal.timeout(10_000),
  });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body?.error?.message ?? `sign-in failed (HTTP ${res.status})`);
  return body;
}

/** The client's token source: the sign-in token once, then a fresh sign-in each time. */
async function getToken() {
  if (pendingToken) {
    const t = pendingToken;
    pendingToken = null;
    return t;
  }
  return (await login(user)).token;
}

els.loginForm.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const name = els.loginName.value.trim();
  els.loginError.hidden = true;
  els.loginSubmit.disabled = true;
  try {
    const r = await login(name);
    pendingToken = r.token;
    start(r.user);
  } catch (e) {
    els.loginError.textContent = e.message;
    els.loginError.hidden = false;
  } finally {
    els.loginSubmit.disabled = false;
  }
});

els.logout.addEventListener('click', () => {
  sessionStorage.removeItem(USER_KEY);
  sessionStorage.removeItem(SESSION_KEY);
  stop();
});

// --- the client ---

function start(name) {
  user = name;
  sessionStorage.setItem(USER_KEY, name);
  els.loginView.hidden = true;
  els.appView.hidden = false;
  els.me.hidden = false;
  els.meName.textContent = name;
  paintAvatar(els.meAvatar, name);
  client = connect({ getToken });
  unbind.push(
    client.on('status', renderStatus),
    client.on('authenticated', onAuthenticated),
    client.on('join', refreshPresence),
    client.on('leave', refreshPresence),
  );
  renderStatus({ state: client.status });
  subscribeFeed();
  loadChatHistory();
}

function stop() {
  unbind.splice(0).forEach((off) => off());
  activeStream?.cancel().catch(() => {});
  client?.close();
  client = null;
  feedSub = null;
  activeStream = null;
  user = null;
  els.appView.hidden = true;
  els.me.hidden = true;
  els.loginView.hidden = false;
  for (const el of [els.teams, els.tasks, els.presence]) el.replaceChildren();
  els.chatLog.replaceChildren(els.chatEmpty);
  els.feedLog.replaceChildren(els.feedEmpty);
  renderStatus({ state: 'idle' });
  els.loginName.focus();
}

function renderStatus(s) {
  els.status.dataset.state = s.state;
  els.status.dataset.degraded = String(Boolean(client?.info?.degraded && s.state === 'authenticated'));
  els.statusRetry.hidden = s.state !== 'stopped';
  const node = client?.info?.node;
  const text = {
    idle: 'Signed out',
    connecting: 'Connecting…',
    authenticating: 'Signing in…',
    authenticated: `Connected · ${node ?? ''}${client?.info?.degraded ? ' · degraded' : ''}`,
    reconnecting: `Reconnecting${s.delayMs ? ` in ${(s.delayMs / 1000).toFixed(1)} s` : '…'}`,
    stopped: `Stopped: ${s.error?.message ?? 'disconnected'}`,
    closed: 'Signed out',
  }[s.state] ?? s.state;
  els.statusText.textContent = text;
  els.status.title = s.error ? `${s.error.code}: ${s.error.message}` : text;
}

els.statusRetry.addEventListener('click', () => client?.reconnect());

function onAuthenticated(info) {
  renderStatus({ state: 'authenticated' });
  els.teams.replaceChildren(...info.teams.map((t) => {
    const name = t.name ?? t.id;
    const li = el('li', {}, [badge(name), el('span', { className: 'grow', textContent: name })]);
    if (t.id === 'demo') li.append(el('span', { className: 'tag', textContent: CHANNEL }));
    return li;
  }));
  if (info.teams.length === 0) els.teams.append(el('li', { className: 'muted', textContent: 'No teams' }));
  els.tasks.replaceChildren(...info.tasks.map((t) => el('li', { dataset: { status: t.status ?? 'open' } }, [
    el('span', { className: 'check' }),
    el('span', { className: 'grow', textContent: t.title ?? t.name ?? t.id }),
    el('span', { className: 'tag', textContent: (t.status ?? 'open').replace('_', ' ') }),
  ])));
  if (info.tasks.length === 0) els.tasks.append(el('li', { className: 'muted', textContent: 'No tasks' }));
  refreshPresence();
}

// --- channel activity ---

function subscribeFeed() {
  // `backlog` replays the channel's recent past first, then live messages follow in
  // offset order; after a reconnect the client resumes from the last offset seen.
  feedSub = client.subscribe(CHANNEL, {
    onMessage: (m) => addFeedItem(m),
    onReset: () => addNotice('Some activity could not be recovered after the reconnect.'),
    onTyping: (t) => showTyping(t.user),
    onError: (e) => addNotice(`Channel error: ${e.message}`),
  }, { backlog: FEED_BACKLOG });
}

function feedItem(m) {
  const who = m.from === 'server' ? 'server' : m.from;
  const text = typeof m.data?.text === 'string' ? m.data.text : JSON.stringify(m.data);
  const ts = typeof m.data?.ts === 'number' ? new Date(m.data.ts) : null;
  const when = ts ? ts.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }) : `#${m.offset}`;
  const item = el('div', { className: `feed-item${who === user ? ' mine' : ''}`, dataset: { offset: String(m.offset) } }, [
    avatar(who),
    el('div', { className: 'body' }, [
      el('div', { className: 'who', textContent: who }, [
        el('span', { className: 'when', textContent: when }),
      ]),
      el('div', { className: 'text', textContent: text }),
    ]),
  ]);
  return item;
}

function addFeedItem(m) {
  if (els.feedLog.querySelector(`[data-offset="${m.offset}"]`)) return;
  els.feedEmpty.hidden = true;
  els.feedLog.append(feedItem(m));
  typers.delete(m.from);
  renderTyping();
  scrollDown(els.feedLog);
}

function addNotice(text) {
  els.feedLog.append(el('div', { className: 'notice', textContent: text }));
  scrollDown(els.feedLog);
}

els.feedForm.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const text = els.feedInput.value.trim();
  if (!text || !client) return;
  els.feedInput.value = '';
  try {
    await client.publish(CHANNEL, { text, ts: Date.now() });
  } catch (e) {
    els.feedInput.value = text;
    addNotice(`Not sent: ${e.message}`);
  }
});

els.feedInput.addEventListener('input', () => {
  const now = Date.now();
  if (client && now - lastTypingSent > TYPING_EVERY_MS) {
    lastTypingSent = now;
    client.typing(CHANNEL);
  }
});

function showTyping(who) {
  if (who === user) return;
  clearTimeout(typers.get(who));
  typers.set(who, setTimeout(() => {
    typers.delete(who);
    renderTyping();
  }, TYPING_SHOW_MS));
  renderTyping();
}

function renderTyping() {
  const names = [...typers.keys()];
  els.typing.textContent = names.length === 0 ? ''
    : names.length === 1 ? `${names[0]} is typing…`
      : `${names.slice(0, -1).join(', ')} and ${names.at(-1)} are typing…`;
}

async function refreshPresence() {
  if (!client) return;
  try {
    const users = await client.presence(CHANNEL);
    els.presence.replaceChildren(...users.map((u) => el('li', {}, [
      avatar(u.user_id),
      el('span', { className: 'grow', textContent: u.user_id === user ? `${u.user_id} (you)` : u.user_id }),
      el('span', { className: 'tag', textContent: `${u.connections} ${u.connections === 1 ? 'tab' : 'tabs'}` }),
      el('span', { className: 'online' }),
    ])));
  } catch {
    // Presence is refreshed on the next join/leave or reconnect.
  }
}

// --- chat ---

async function loadChatHistory() {
  const sessionId = sessionStorage.getItem(SESSION_KEY);
  if (!sessionId) return;
  try {
    const messages = await client.chat.history(sessionId);
    for (const m of messages) addChatMessage(m.role, m.content);
  } catch {
    sessionStorage.removeItem(SESSION_KEY);
  }
}

function addChatMessage(role, text) {
  els.chatEmpty.hidden = true;
  const bubble = el('div', { className: 'bubble', textContent: text });
  const row = el('div', { className: `msg ${role}` }, [
    role === 'user' ? avatar(user) : el('span', { className: 'avatar bot-avatar', textContent: 'AI' }),
    bubble,
  ]);
  els.chatLog.append(row);
  scrollDown(els.chatLog);
  return { row, bubble };
}

els.chatForm.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const message = els.chatInput.value.trim();
  if (!message || !client || activeStream) return;
  els.chatInput.value = '';
  autosize();
  addChatMessage('user', message);
  const { row, bubble } = addChatMessage('assistant', '');
  row.classList.add('streaming');
  setStreaming(true);
  const sessionId = sessionStorage.getItem(SESSION_KEY) ?? undefined;
  const stream = client.chat.send({ message, sessionId });
  activeStream = stream;
  stream.accepted.then(({ sessionId: sid }) => sessionStorage.setItem(SESSION_KEY, sid), () => {});
  try {
    for await (const chunk of stream) {
      bubble.textContent = chunk.text;
      scrollDown(els.chatLog);
    }
    if (!bubble.textContent) bubble.textContent = '(stopped before any text)';
  } catch (e) {
    row.classList.add('failed');
    bubble.textContent = `${bubble.textContent}${bubble.textContent ? '\n\n' : ''}⚠ ${e.message}`;
  } finally {
    row.classList.remove('streaming');
    activeStream = null;
    setStreaming(false);
  }
});

els.chatCancel.addEventListener('click', () => activeStream?.cancel().catch(() => {}));

els.chatNew.addEventListener('click', () => {
  sessionStorage.removeItem(SESSION_KEY);
  els.chatLog.replaceChildren(els.chatEmpty);
  els.chatEmpty.hidden = false;
});

els.chatInput.addEventListener('keydown', (ev) => {
  if (ev.key === 'Enter' && !ev.shiftKey) {
    ev.preventDefault();
    els.chatForm.requestSubmit();
  }
});
els.chatInput.addEventListener('input', autosize);

function autosize() {
  els.chatInput.style.height = 'auto';
  els.chatInput.style.height = `${els.chatInput.scrollHeight}px`;
}

function setStreaming(on) {
  els.chatSend.hidden = on;
  els.chatCancel.hidden = !on;
}

// --- helpers ---

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  const { dataset, ...rest } = props;
  Object.assign(node, rest);
  if (dataset) Object.assign(node.dataset, dataset);
  node.append(...children);
  return node;
}

function hue(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function paintAvatar(node, name) {
  node.textContent = name.slice(0, 2);
  node.style.background = `hsl(${hue(name)} 62% 52%)`;
}

function avatar(name) {
  const a = el('span', { className: 'avatar' });
  paintAvatar(a, name);
  return a;
}

function badge(name) {
  const b = el('span', { className: 'team-badge', textContent: name.slice(0, 1).toUpperCase() });
  b.style.background = `hsl(${hue(name)} 55% 50%)`;
  return b;
}

function scrollDown(node) {
  node.scrollTop = node.scrollHeight;
}

// A reload keeps the user signed in (a fresh token is fetched by getToken).
const remembered = sessionStorage.getItem(USER_KEY);
if (remembered) start(remembered);
