'use strict';
// What both peers share: the command line, HS256 token checks, and the protocol
// subset of docs/PROTOCOL.md that `loadtest connect` and `loadtest broadcast` use,
// written once against a small transport interface so that uws.js and ws.js differ
// only in how bytes reach sockets:
//
//   transport.send(conn, text)          one text frame to one connection
//   transport.close(conn, code, reason) a close frame (after any queued frames)
//   transport.join(conn, channel)       subscribe the connection to a channel
//   transport.leave(conn, channel)      unsubscribe it
//   transport.fanout(channel, text)     one text frame to every subscriber
//
// The subset: credentials from `Authorization: Bearer <jwt>`, a `bearer.<jwt>`
// subprotocol entry or `?token=` (that order), else an `auth` frame within 10 s;
// subprotocol `switchboard.v1` selected when offered; `authenticated`; `ping`;
// `subscribe` (answered `subscribed {channel, offset, epoch, recovered}`),
// `unsubscribe`, client `publish` (`ack {offset}`); `message {channel, offset, data,
// from}` with gap-free per-channel offsets counted from 1 in one epoch per process;
// `POST /v1/publish` with the api key (200 `{"offset"}`, JSON errors as the gateway's);
// `GET /healthz` and `/readyz`. Not done (no Redis, no NATS, one process): history and
// recovery with `since`, presence, typing, read offsets, chat, refresh, revocation,
// per-user and per-address limits, the message rate limit, user context (teams and
// tasks are empty), draining.

const crypto = require('node:crypto');

const SUBPROTOCOL = 'switchboard.v1';
const BEARER_PREFIX = 'bearer.';
const MAX_TOKEN_BYTES = 8 * 1024;
const LEEWAY_S = 5;
const MAX_LIFETIME_S = 86400;
const AUTH_TIMEOUT_MS = 10_000;
const MAX_MESSAGE_BYTES = 64 * 1024;
const MAX_SUBSCRIPTIONS = 100;
const USER_ID = /^[A-Za-z0-9_-]{1,128}$/;
const CHANNEL = /^([a-z0-9_-]{1,64}):([A-Za-z0-9_-]{1,128})$/;

const USAGE = `usage: node PEER.js --port P --secret S --api-key K [--host 127.0.0.1]
       [--namespaces bench] [--max-backpressure BYTES] [--idle-timeout SECS] [--node ID]
Environment instead of flags: PORT, SB_JWT_SECRET, SB_API_KEY, SB_PUBLIC_NAMESPACES.
--port 0 picks a free port; the line printed once listening names it.`;

/** The command line (flags win over the environment); exits 2 on a bad one. */
function parseArgs(name, argv = process.argv.slice(2)) {
    const opts = {
        host: '127.0.0.1',
        port: process.env.PORT,
        secret: process.env.SB_JWT_SECRET,
        apiKey: process.env.SB_API_KEY,
        namespaces: process.env.SB_PUBLIC_NAMESPACES || 'bench',
        // Bytes queued for one slow subscriber before it is closed (the gateway
        // closes 4008 SLOW_CONSUMER when its 256-frame queue stays full).
        maxBackpressure: 4 * 1024 * 1024,
        // uWS only: 0 = never close idle connections (the gateway's is 60 s with
        // pings every 25 s; loadtest runs hold idle connections).
        idleTimeout: 0,
        node: name,
    };
    const keys = {
        '--host': 'host', '--port': 'port', '--secret': 'secret', '--api-key': 'apiKey',
        '--namespaces': 'namespaces', '--max-backpressure': 'maxBackpressure',
        '--idle-timeout': 'idleTimeout', '--node': 'node',
    };
    const fail = (msg) => {
        console.error(`${name}: ${msg}\n${USAGE}`);
        process.exit(2);
    };
    for (let i = 0; i < argv.length; i++) {
        let arg = argv[i];
        let value;
        const eq = arg.indexOf('=');
        if (eq > 0) {
            value = arg.slice(eq + 1);
            arg = arg.slice(0, eq);
        }
        if (arg === '-h' || arg === '--help') {
            console.log(USAGE);
            process.exit(0);
        }
        const key = keys[arg];
        if (!key) fail(`unknown argument ${arg}`);
        if (value === undefined) {
            if (i + 1 >= argv.length) fail(`${arg} needs a value`);
            value = argv[++i];
        }
        opts[key] = value;
    }
    const port = Number(opts.port);
    if (!Number.isInteger(port) || port < 0 || port > 65535) fail('--port must be 0..65535');
    opts.port = port;
    if (!opts.secret || Buffer.byteLength(opts.secret) < 32) {
        fail('--secret (SB_JWT_SECRET) must be at least 32 bytes, like the gateway\'s');
    }
    if (!opts.apiKey) fail('--api-key (SB_API_KEY) is required');
    opts.maxBackpressure = Number(opts.maxBackpressure);
    if (!(opts.maxBackpressure > 0)) fail('--max-backpressure must be positive');
    opts.idleTimeout = Number(opts.idleTimeout);
    if (!Number.isInteger(opts.idleTimeout) || opts.idleTimeout < 0) fail('--idle-timeout must be >= 0');
    opts.namespaces = new Set(String(opts.namespaces).split(',').map((s) => s.trim()).filter(Boolean));
    return opts;
}

function b64urlJson(part) {
    return JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
}

/** The user id as shared/src/auth.rs reads it: the first of sub, user_id, userId, id
 *  that is present and not null or "" decides; null when it is unusable. */
function userIdOf(claims) {
    for (const key of ['sub', 'user_id', 'userId', 'id']) {
        const v = claims[key];
        if (v === undefined || v === null || v === '') continue;
        let id;
        if (typeof v === 'string') id = v;
        else if (typeof v === 'number' && Number.isInteger(v)) id = String(v);
        else return null;
        return USER_ID.test(id) ? id : null;
    }
    return null;
}

/** Checks an HS256 token: {user, exp, email, role} or {code, close, message}. */
function verifyToken(token, secret, now = Math.floor(Date.now() / 1000)) {
    const invalid = (message) => ({ code: 'TOKEN_INVALID', close: 4503, message });
    if (typeof token !== 'string' || token.length === 0) return invalid('missing or malformed token');
    if (Buffer.byteLength(token) > MAX_TOKEN_BYTES) return invalid('token too large');
    const parts = token.split('.');
    if (parts.length !== 3) return invalid('malformed token');
    let header;
    let claims;
    try {
        header = b64urlJson(parts[0]);
        claims = b64urlJson(parts[1]);
    } catch {
        return invalid('malformed token');
    }
    if (!header || header.alg !== 'HS256') return invalid('algorithm not allowed');
    const want = crypto.createHmac('sha256', secret).update(`${parts[0]}.${parts[1]}`).digest();
    const got = Buffer.from(parts[2], 'base64url');
    if (got.length !== want.length || !crypto.timingSafeEqual(got, want)) {
        return invalid('bad signature');
    }
    if (!claims || typeof claims !== 'object' || Array.isArray(claims)) return invalid('bad claims');
    const exp = claims.exp;
    if (typeof exp !== 'number' || !Number.isFinite(exp)) return invalid('missing exp');
    if (now > exp + LEEWAY_S) {
        return { code: 'TOKEN_EXPIRED', close: 4001, message: 'token expired', action: 'REFRESH_TOKEN' };
    }
    if (typeof claims.nbf === 'number' && claims.nbf > now + LEEWAY_S) return invalid('token not yet valid');
    if ((typeof claims.iat === 'number' && exp - claims.iat > MAX_LIFETIME_S) ||
        exp - now > MAX_LIFETIME_S + LEEWAY_S) {
        return invalid('token lifetime exceeds the allowed maximum');
    }
    const user = userIdOf(claims);
    if (user === null) return invalid('invalid sub');
    const str = (v) => (typeof v === 'string' && v !== '' ? v : undefined);
    return { user, exp, email: str(claims.email), role: str(claims.role) };
}

/** From the upgrade request: the subprotocol to select ('' for none) and the token
 *  (undefined when none was sent: the client must send `auth`). */
function credentials(authorization, protocolHeader, query) {
    const offered = (protocolHeader || '').split(',').map((s) => s.trim()).filter(Boolean);
    const protocol = offered.includes(SUBPROTOCOL) ? SUBPROTOCOL : '';
    let token;
    if (authorization) {
        const m = /^Bearer +(\S+) *$/i.exec(authorization);
        token = m ? m[1] : ''; // a malformed header is a bad token, not a missing one
    } else {
        const bearer = offered.find((p) => p.startsWith(BEARER_PREFIX));
        if (bearer) token = bearer.slice(BEARER_PREFIX.length);
        else if (query) token = new URLSearchParams(query).get('token') ?? undefined;
    }
    return { protocol, token };
}

function errorFrame(code, message, id, extra) {
    const retryable = ['RATE_LIMITED', 'UNAVAILABLE', 'INTERNAL', 'OVERLOADED', 'AUTH_TIMEOUT',
        'SLOW_CONSUMER'].includes(code);
    const f = { type: 'error', code, message, retryable, ...extra };
    if (id !== undefined) f.id = id;
    return JSON.stringify(f);
}

function httpError(status, code, message) {
    return [status, JSON.stringify({ error: { code, message } })];
}

function validId(id) {
    return id === undefined || (typeof id === 'string' && id.length <= 64) || Number.isSafeInteger(id);
}

let nextConn = 0;

/** The protocol state of one process: channels, offsets, connections. */
class Hub {
    constructor(opts, transport) {
        this.opts = opts;
        this.t = transport;
        // One epoch per process: offsets start again at 1 when the peer restarts.
        this.epoch = `${opts.node}-${Date.now().toString(36)}-${crypto.randomBytes(4).toString('hex')}`;
        this.channels = new Map(); // channel -> last offset
        this.connections = 0;
        this.apiKey = Buffer.from(`Bearer ${opts.apiKey}`);
    }

    /** A fresh connection state for the upgrade request's credentials. */
    connState(authorization, protocolHeader, query) {
        const { protocol, token } = credentials(authorization, protocolHeader, query);
        return {
            protocol,
            token,
            id: `${this.opts.node}-${(nextConn++).toString(36)}`,
            user: null,
            exp: 0,
            subs: new Set(),
            closed: false,
            authTimer: null,
        };
    }

    /** The connection is open: authenticate it, or wait for `auth`. */
    opened(c) {
        this.connections++;
        if (c.token === undefined) {
            c.authTimer = setTimeout(() => {
                c.authTimer = null;
                if (!c.closed && c.user === null) {
                    this.t.send(c, errorFrame('AUTH_TIMEOUT', 'no auth frame in time'));
                    this.t.close(c, 4000, 'auth timeout');
                }
            }, AUTH_TIMEOUT_MS);
            return;
        }
        this.authenticate(c, c.token, undefined, true);
        c.token = undefined;
    }

    closed(c) {
        if (c.closed) return;
        c.closed = true;
        this.connections--;
        if (c.authTimer) clearTimeout(c.authTimer);
        // Transports drop a closed socket's subscriptions themselves (uWS does, ws.js
        // removes it from its sets here).
        for (const ch of c.subs) this.t.leave(c, ch, true);
        c.subs.clear();
    }

    authenticate(c, token, id, atConnect) {
        const v = verifyToken(token, this.opts.secret);
        if (v.code) {
            const extra = v.action ? { action: v.action } : undefined;
            this.t.send(c, errorFrame(v.code, v.message, id, extra));
            if (atConnect || v.close) this.t.close(c, v.close, v.code);
            return;
        }
        if (c.authTimer) {
            clearTimeout(c.authTimer);
            c.authTimer = null;
        }
        c.user = v.user;
        c.exp = v.exp;
        // Every connection hears its own user channel, as on the gateway.
        const own = `user:${v.user}`;
        c.subs.add(own);
        this.t.join(c, own);
        const user = { id: v.user };
        if (v.email) user.email = v.email;
        if (v.role) user.role = v.role;
        const f = {
            type: 'authenticated', user, expires_at: v.exp, teams: [], tasks: [],
            degraded: false, node: this.opts.node, conn_id: c.id,
        };
        if (id !== undefined) f.id = id;
        this.t.send(c, JSON.stringify(f));
    }

    /** One text frame from a client. */
    message(c, text) {
        let f;
        try {
            f = JSON.parse(text);
        } catch {
            return this.t.send(c, errorFrame('BAD_REQUEST', 'unparseable JSON'));
        }
        if (!f || typeof f !== 'object' || Array.isArray(f)) {
            return this.t.send(c, errorFrame('BAD_REQUEST', 'a frame must be a JSON object'));
        }
        const id = f.id;
        if (!validId(id)) return this.t.send(c, errorFrame('BAD_REQUEST', 'bad id'));
        const bad = (msg) => this.t.send(c, errorFrame('BAD_REQUEST', msg, id));
        if (typeof f.type !== 'string') return bad('missing type');
        if (f.type === 'ping') return this.t.send(c, JSON.stringify(id === undefined ? { type: 'pong' } : { type: 'pong', id }));
        if (c.user === null) {
            if (f.type !== 'auth') return bad('send an `auth` frame first');
            if (typeof f.token !== 'string') return bad('auth: missing token');
            return this.authenticate(c, f.token, id, false);
        }
        switch (f.type) {
        case 'auth':
            return bad('already authenticated (use refresh)');
        case 'subscribe': {
            const ch = f.channel;
            if (typeof ch !== 'string' || !CHANNEL.test(ch)) return bad('subscribe: bad channel');
            if (!this.mayUse(c, ch)) return this.t.send(c, errorFrame('FORBIDDEN', `not allowed: ${ch}`, id));
            if (!c.subs.has(ch)) {
                if (c.subs.size > MAX_SUBSCRIPTIONS) return bad('too many subscriptions');
                c.subs.add(ch);
                this.t.join(c, ch);
            }
            // No history here: nothing is ever recovered.
            const r = { type: 'subscribed', channel: ch, offset: this.channels.get(ch) || 0, epoch: this.epoch, recovered: false };
            if (id !== undefined) r.id = id;
            return this.t.send(c, JSON.stringify(r));
        }
        case 'unsubscribe': {
            const ch = f.channel;
            if (typeof ch !== 'string' || !CHANNEL.test(ch)) return bad('unsubscribe: bad channel');
            if (c.subs.delete(ch)) this.t.leave(c, ch, false);
            const r = { type: 'unsubscribed', channel: ch };
            if (id !== undefined) r.id = id;
            return this.t.send(c, JSON.stringify(r));
        }
        case 'publish': {
            const ch = f.channel;
            if (typeof ch !== 'string' || !CHANNEL.test(ch)) return bad('publish: bad channel');
            if (!('data' in f)) return bad('publish: missing data');
            if (!this.mayUse(c, ch)) return this.t.send(c, errorFrame('FORBIDDEN', `not allowed: ${ch}`, id));
            const offset = this.publish(ch, f.data, c.user);
            const r = { type: 'ack', offset };
            if (id !== undefined) r.id = id;
            return this.t.send(c, JSON.stringify(r));
        }
        default:
            return bad(`unknown type ${JSON.stringify(f.type).slice(0, 80)}`);
        }
    }

    mayUse(c, ch) {
        const ns = ch.slice(0, ch.indexOf(':'));
        return ch === `user:${c.user}` || (ns !== 'user' && this.opts.namespaces.has(ns));
    }

    /** Gives the channel's next offset to `data` and sends it to every subscriber. */
    publish(ch, data, from) {
        const offset = (this.channels.get(ch) || 0) + 1;
        this.channels.set(ch, offset);
        // The gateway's exact layout (loadtest's fast path reads it).
        const frame = `{"type":"message","channel":${JSON.stringify(ch)},"offset":${offset},` +
            `"data":${JSON.stringify(data)},"from":${JSON.stringify(from)}}`;
        this.t.fanout(ch, frame);
        return offset;
    }

    /** An HTTP request: [status, JSON body]. `body` is a Buffer (or null when it was
     *  over the limit). */
    http(method, path, authorization, body) {
        if (path === '/healthz' || path === '/readyz') {
            return method === 'GET' ? [200, `{"ok":true,"connections":${this.connections}}`]
                : httpError(405, 'METHOD_NOT_ALLOWED', 'use GET');
        }
        if (path !== '/v1/publish') return httpError(404, 'NOT_FOUND', 'no such endpoint');
        const got = Buffer.from(authorization || '');
        if (got.length !== this.apiKey.length || !crypto.timingSafeEqual(got, this.apiKey)) {
            return httpError(401, 'UNAUTHORIZED', 'missing or wrong api key');
        }
        if (method !== 'POST') return httpError(405, 'METHOD_NOT_ALLOWED', 'use POST');
        if (body === null) return httpError(413, 'TOO_LARGE', 'body over the limit');
        let req;
        try {
            req = JSON.parse(body.toString('utf8'));
        } catch {
            return httpError(400, 'BAD_REQUEST', 'unparseable JSON');
        }
        if (!req || typeof req !== 'object' || Array.isArray(req)) return httpError(400, 'BAD_REQUEST', 'not an object');
        for (const k of Object.keys(req)) {
            if (k !== 'channel' && k !== 'data') return httpError(400, 'BAD_REQUEST', `unknown field ${k}`);
        }
        if (typeof req.channel !== 'string' || !CHANNEL.test(req.channel)) return httpError(400, 'BAD_REQUEST', 'bad channel');
        if (!('data' in req)) return httpError(400, 'BAD_REQUEST', 'missing data');
        const offset = this.publish(req.channel, req.data, 'server');
        return [200, `{"offset":${offset}}`];
    }
}

/** The one line a peer prints once it listens (the compare script waits for it). */
function listening(name, host, port, extra) {
    console.log(`${name} listening on ws://${host}:${port}/ws pid ${process.pid} node ${process.version}${extra ? ` ${extra}` : ''}`);
}

module.exports = {
    SUBPROTOCOL, MAX_MESSAGE_BYTES, parseArgs, verifyToken, credentials, userIdOf, errorFrame, Hub, listening,
};
