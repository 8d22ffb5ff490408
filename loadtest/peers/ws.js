#!/usr/bin/env node
'use strict';
// Benchmark peer: Node's `ws` (8.x, with bufferutil) on node:http, speaking the
// protocol subset in lib.js. Fan-out walks the channel's set of sockets and sends the
// same Buffer to each; a subscriber with more than --max-backpressure bytes queued is
// closed 4008 SLOW_CONSUMER, as the gateway does.
//
//   node loadtest/peers/ws.js --port 18201 --secret "$SECRET" --api-key "$API_KEY"

const http = require('node:http');
const { WebSocketServer } = require('ws');
const { SUBPROTOCOL, MAX_MESSAGE_BYTES, parseArgs, Hub, listening, errorFrame } = require('./lib');

const opts = parseArgs('ws');
const subscribers = new Map(); // channel -> Set of connection states

const transport = {
    send(c, text) {
        if (!c.closed) c.sock.send(text);
    },
    close(c, code, reason) {
        if (!c.closed) c.sock.close(code, reason);
    },
    join(c, ch) {
        let set = subscribers.get(ch);
        if (!set) subscribers.set(ch, (set = new Set()));
        set.add(c);
    },
    leave(c, ch) {
        const set = subscribers.get(ch);
        if (set && set.delete(c) && set.size === 0) subscribers.delete(ch);
    },
    fanout(ch, text) {
        const set = subscribers.get(ch);
        if (!set) return;
        const buf = Buffer.from(text);
        for (const c of set) {
            if (c.closed || c.slow) continue;
            if (c.sock.bufferedAmount > opts.maxBackpressure) {
                c.slow = true;
                c.sock.send(errorFrame('SLOW_CONSUMER', 'client did not read fast enough'));
                c.sock.close(4008, 'slow consumer');
                continue;
            }
            c.sock.send(buf, { binary: false });
        }
    },
};
const hub = new Hub(opts, transport);

const server = http.createServer((req, res) => {
    const path = req.url.split('?')[0];
    const reply = ([status, body]) => {
        res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
        res.end(body);
    };
    if (req.method !== 'POST' || path !== '/v1/publish') {
        req.resume();
        return reply(hub.http(req.method, path, req.headers.authorization, Buffer.alloc(0)));
    }
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
        size += chunk.length;
        if (size <= MAX_MESSAGE_BYTES) chunks.push(chunk);
    });
    req.on('end', () => reply(hub.http(req.method, path, req.headers.authorization, size > MAX_MESSAGE_BYTES ? null : Buffer.concat(chunks))));
    req.on('error', () => {});
});
// loadtest's publisher keeps its HTTP/1.1 connection: do not close it between requests.
server.keepAliveTimeout = 65_000;
server.headersTimeout = 66_000;

const wss = new WebSocketServer({
    noServer: true,
    maxPayload: MAX_MESSAGE_BYTES,
    perMessageDeflate: false,
    clientTracking: false,
    handleProtocols: (protocols) => (protocols.has(SUBPROTOCOL) ? SUBPROTOCOL : false),
});

server.on('upgrade', (req, socket, head) => {
    socket.on('error', () => {});
    const [path, query] = req.url.split('?');
    if (path !== '/ws') {
        socket.end('HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n');
        return;
    }
    const c = hub.connState(req.headers.authorization, req.headers['sec-websocket-protocol'], query);
    wss.handleUpgrade(req, socket, head, (ws) => {
        c.sock = ws;
        // A malformed frame must end that connection, not the process.
        ws.on('error', () => {});
        ws.on('message', (data, isBinary) => {
            if (isBinary) return transport.close(c, 1003, 'binary frames are not accepted');
            hub.message(c, data.toString('utf8')); // ws has checked the UTF-8 (close 1007)
        });
        ws.on('close', () => hub.closed(c));
        hub.opened(c);
    });
});
server.on('clientError', (err, socket) => socket.destroy());

server.listen({ host: opts.host, port: opts.port, backlog: 4096 }, () => {
    let bufferutil = 'without bufferutil';
    try {
        require('bufferutil');
        bufferutil = 'with bufferutil';
    } catch { /* optional */ }
    listening('ws', opts.host, server.address().port, `ws ${require('ws/package.json').version} ${bufferutil}`);
});
server.on('error', (e) => {
    console.error(`ws: ${e.message}`);
    process.exit(1);
});

for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(0));
