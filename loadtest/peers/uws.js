#!/usr/bin/env node
'use strict';
// Benchmark peer: uWebSockets.js (the native uWS v20.30 addon of
// @trufflesuite/uws-js-unofficial) speaking the protocol subset in lib.js. Fan-out is
// uWS's own pub/sub (`app.publish`, one topic per channel). Refuses to start on the
// package's JavaScript fallback, which it loads silently when the addon cannot load.
//
//   node loadtest/peers/uws.js --port 18200 --secret "$SECRET" --api-key "$API_KEY"

const { STATUS_CODES } = require('node:http');
const { MAX_MESSAGE_BYTES, parseArgs, Hub, listening } = require('./lib');

const opts = parseArgs('uws');

if (/^(1|true)$/i.test(process.env.UWS_USE_FALLBACK || '')) {
    console.error('uws: UWS_USE_FALLBACK is set; refusing to benchmark the JavaScript fallback');
    process.exit(1);
}
// The package prints "Falling back to a NodeJS implementation" (console.warn) and
// returns its JS implementation when the addon fails to load: catch both signs.
let fellBack = false;
const warn = console.warn;
console.warn = (...args) => {
    if (args.some((a) => /falling back/i.test(String(a)))) fellBack = true;
    warn(...args);
};
const uWS = require('@trufflesuite/uws-js-unofficial');
console.warn = warn;
const addon = Object.keys(require.cache).find((k) => /uws_[^/]*\.node$/.test(k));
if (fellBack || !addon) {
    console.error('uws: the native uWebSockets.js addon did not load (JavaScript fallback); refusing to start');
    process.exit(1);
}

const app = uWS.App();
const decoder = new TextDecoder('utf-8', { fatal: true });

const transport = {
    send(c, text) {
        if (!c.closed) c.sock.send(text, false, false);
    },
    close(c, code, reason) {
        if (!c.closed) c.sock.end(code, reason);
    },
    join(c, ch) {
        if (!c.closed) c.sock.subscribe(ch);
    },
    leave(c, ch, closing) {
        // A closing socket's topics are dropped by uWS itself.
        if (!closing && !c.closed) c.sock.unsubscribe(ch);
    },
    fanout(ch, text) {
        app.publish(ch, text, false, false);
    },
};
const hub = new Hub(opts, transport);

app.ws('/ws', {
    compression: uWS.DISABLED,
    maxPayloadLength: MAX_MESSAGE_BYTES,
    idleTimeout: opts.idleTimeout,
    sendPingsAutomatically: opts.idleTimeout > 0,
    // A subscriber with this much queued is closed rather than skipped (uWS would
    // otherwise drop its messages: gaps).
    maxBackpressure: opts.maxBackpressure,
    closeOnBackpressureLimit: true,
    upgrade: (res, req, context) => {
        const c = hub.connState(req.getHeader('authorization'), req.getHeader('sec-websocket-protocol'), req.getQuery());
        res.upgrade({ c }, req.getHeader('sec-websocket-key'), c.protocol,
            req.getHeader('sec-websocket-extensions'), context);
    },
    open: (ws) => {
        const { c } = ws.getUserData();
        c.sock = ws;
        hub.opened(c);
    },
    message: (ws, message, isBinary) => {
        const { c } = ws.getUserData();
        if (isBinary) return transport.close(c, 1003, 'binary frames are not accepted');
        let text;
        try {
            text = decoder.decode(message);
        } catch {
            return transport.close(c, 1007, 'invalid UTF-8');
        }
        hub.message(c, text);
    },
    close: (ws) => {
        hub.closed(ws.getUserData().c);
    },
});

function answer(res, [status, body]) {
    if (res.aborted) return;
    res.cork(() => {
        res.writeStatus(`${status} ${STATUS_CODES[status] || ''}`).writeHeader('content-type', 'application/json').end(body);
    });
}

app.any('/*', (res, req) => {
    const method = req.getMethod().toUpperCase();
    const path = req.getUrl();
    const authorization = req.getHeader('authorization');
    res.onAborted(() => {
        res.aborted = true;
    });
    if (method !== 'POST' || path !== '/v1/publish') {
        return answer(res, hub.http(method, path, authorization, Buffer.alloc(0)));
    }
    const chunks = [];
    let size = 0;
    res.onData((chunk, isLast) => {
        if (size <= MAX_MESSAGE_BYTES) {
            size += chunk.byteLength;
            if (size <= MAX_MESSAGE_BYTES) chunks.push(Buffer.from(chunk.slice(0))); // chunk is reused by uWS
        }
        if (isLast) answer(res, hub.http(method, path, authorization, size > MAX_MESSAGE_BYTES ? null : Buffer.concat(chunks)));
    });
});

app.listen(opts.host, opts.port, (token) => {
    if (!token) {
        console.error(`uws: cannot listen on ${opts.host}:${opts.port}`);
        process.exit(1);
    }
    listening('uws', opts.host, uWS.us_socket_local_port(token), `uWS native ${require('node:path').basename(addon)}`);
});

for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(0));
