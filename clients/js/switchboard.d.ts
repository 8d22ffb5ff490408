// Type declarations for switchboard.js (the Switchboard JavaScript client).

export declare const SUBPROTOCOL: 'switchboard.v1';

export declare const DEFAULTS: Readonly<{
  backoffBaseMs: number;
  backoffCapMs: number;
  stableAfterMs: number;
  requestTimeoutMs: number;
  pingIntervalMs: number;
  pongTimeoutMs: number;
  refreshRetryMs: number;
  drainJitterMs: number;
  maxQueued: number;
  orphanTtlMs: number;
  maxOrphans: number;
  chatRecheckMs: number;
  chatIdleTimeoutMs: number;
  chatSilenceMs: number;
  maxFinishedChats: number;
  maxTokenFailures: number;
  maxFrameBytes: number;
  gapHistoryLimit: number;
}>;

/** Server error codes (PROTOCOL.md section 4) and the client's own. */
export type ErrorCode =
  | 'BAD_REQUEST' | 'FORBIDDEN' | 'NOT_FOUND' | 'RATE_LIMITED' | 'UNAVAILABLE' | 'TOO_LARGE'
  | 'INTERNAL' | 'OVERLOADED' | 'AUTH_TIMEOUT' | 'TOKEN_EXPIRED' | 'TOKEN_INVALID'
  | 'SLOW_CONSUMER' | 'CONNECTION_LIMIT'
  // client side
  | 'TIMEOUT' | 'DISCONNECTED' | 'CLOSED' | 'QUEUE_FULL' | 'TOKEN_UNAVAILABLE' | 'UNSUBSCRIBED'
  | 'BAD_FRAME' | `CLOSED_${number}`
  | (string & {});

export declare class SwitchboardError extends Error {
  name: 'SwitchboardError';
  code: ErrorCode;
  retryable: boolean;
  /** The WebSocket close code, when the error ended a connection. */
  closeCode?: number;
  retryAfterMs?: number;
  action?: 'REFRESH_TOKEN';
  constructor(code: ErrorCode, message: string, extra?: { retryable?: boolean; closeCode?: number; retryAfterMs?: number; action?: string; cause?: unknown });
}

export type CloseAction = 'none' | 'fix' | 'stop' | 'refresh' | 'immediate' | 'backoff';
/** The reconnect rule of PROTOCOL.md section 4 for a close code. */
export declare function closeAction(code: number): CloseAction;
/** random(0, min(capMs, baseMs * 2^attempt)) ms. */
export declare function backoffDelay(attempt: number, opts?: { baseMs?: number; capMs?: number; random?: () => number }): number;

export interface TokenRequest {
  /** 'connect' (first or later connection), 'expired' (after close 4001: never return the old token), 'refresh' (token_expiring). */
  reason: 'connect' | 'reconnect' | 'expired' | 'refresh' | 'online';
}

export interface WebSocketLike {
  readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

export interface ConnectOptions extends Partial<typeof DEFAULTS> {
  /** ws:// or wss:// URL; in a browser defaults to same-origin `/ws`. */
  url?: string;
  /** Resolves to a JWT. Called before every connection attempt and on token_expiring. Reject with a SwitchboardError whose `retryable` is false to stop. */
  getToken: (req: TokenRequest) => string | Promise<string>;
  /** A WebSocket constructor (Node 20: the `ws` package, or run with --experimental-websocket). */
  WebSocket?: new (url: string, protocols: string[]) => WebSocketLike;
  backoff?: { baseMs?: number; capMs?: number };
  /** false: a private connection instead of the shared one for this URL. */
  shared?: boolean;
  /** Test hooks. */
  random?: () => number;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (t: unknown) => void;
  now?: () => number;
}

export interface ContextItem { id: string; [key: string]: unknown }

export interface SessionInfo {
  user: { id: string; email?: string; role?: string };
  expiresAt: number;
  teams: ContextItem[];
  tasks: ContextItem[];
  degraded: boolean;
  node: string;
  connId: string;
}

export type Status = 'idle' | 'connecting' | 'authenticating' | 'authenticated' | 'reconnecting' | 'stopped' | 'closed';

export interface StatusEvent {
  state: Status;
  attempt?: number;
  /** When reconnecting: the wait before the next attempt. */
  delayMs?: number;
  closeCode?: number;
  error?: SwitchboardError;
  node?: string;
  degraded?: boolean;
}

export interface ChannelMessage {
  channel: string;
  offset: number;
  data: unknown;
  /** The publishing user's id, or "server". */
  from: string;
  /** True for messages replayed by the `backlog` option. */
  backlog?: boolean;
}

export interface SubscribedInfo {
  channel: string;
  offset: number;
  /** Which count of the channel's offsets `offset` belongs to; pass it back with `since`. */
  epoch: string | null;
  recovered: boolean;
  /** True for a resubscribe after a reconnect. */
  resumed: boolean;
  readOffset?: number;
  backlog?: number;
  shared?: boolean;
}

export interface ResetInfo extends SubscribedInfo {
  /** The last offset delivered before; messages after it were lost: reload the channel. */
  lastOffset: number | null;
}

export interface ChannelEvent { channel: string; user: string; offset?: number }

export interface SubscriptionHandlers {
  onMessage?: (m: ChannelMessage) => void;
  onSubscribed?: (info: SubscribedInfo) => void;
  /**
   * A resume (or `since`) could not be replayed, or the channel's offsets started over
   * while subscribed (the server lost its history): reload by other means.
   */
  onReset?: (info: ResetInfo) => void;
  onJoin?: (e: ChannelEvent) => void;
  onLeave?: (e: ChannelEvent) => void;
  onTyping?: (e: ChannelEvent) => void;
  onRead?: (e: ChannelEvent) => void;
  onError?: (e: SwitchboardError) => void;
}

export interface Subscription {
  readonly channel: string;
  /** Resolves with the first `subscribed`; rejects if refused (e.g. FORBIDDEN). */
  readonly ready: Promise<SubscribedInfo>;
  readonly offset: number | null;
  on(event: 'message', fn: (m: ChannelMessage) => void): () => void;
  on(event: 'subscribed', fn: (i: SubscribedInfo) => void): () => void;
  on(event: 'reset', fn: (i: ResetInfo) => void): () => void;
  on(event: 'join' | 'leave' | 'typing' | 'read', fn: (e: ChannelEvent) => void): () => void;
  on(event: 'error', fn: (e: SwitchboardError) => void): () => void;
  unsubscribe(): void;
}

export interface ChatChunk {
  /** Text to append. */
  content: string;
  /** The whole reply so far. */
  text: string;
  /** The server's seq, or null for text filled in from chat.complete/history. */
  seq: number | null;
  /** When true, replace everything shown with `text` (a redelivered request produced a different reply). */
  reset: boolean;
}

export interface ChatStream extends AsyncIterable<ChatChunk> {
  /** Set once the server acked the request. */
  readonly requestId: string | null;
  readonly sessionId: string | null;
  readonly accepted: Promise<{ requestId: string; sessionId: string }>;
  /** The complete reply (chat.complete or history: authoritative). */
  readonly done: Promise<string>;
  /** The reply so far. */
  readonly text: string;
  /** Where the final text came from. */
  readonly source?: 'complete' | 'history';
  readonly usage?: { prompt_tokens: number; completion_tokens: number; total_tokens: number };
  cancel(): Promise<void>;
}

export interface HistoryMessage { role: 'user' | 'assistant'; content: string; ts: number; request_id?: string }

export interface PresenceUser { user_id: string; connections: number }

export interface Client {
  readonly status: Status;
  readonly info: SessionInfo | null;
  readonly error: SwitchboardError | null;
  readonly chat: {
    send(opts: { message: string; sessionId?: string }): ChatStream;
    history(sessionId: string, opts?: { limit?: number }): Promise<HistoryMessage[]>;
  };
  on(event: 'status', fn: (s: StatusEvent) => void): () => void;
  on(event: 'authenticated', fn: (info: SessionInfo) => void): () => void;
  on(event: 'disconnected', fn: (e: { closeCode: number; reason: string; error: SwitchboardError }) => void): () => void;
  on(event: 'draining', fn: (e: { reason: string; retryAfterMs: number }) => void): () => void;
  on(event: 'token_expiring' | 'refreshed', fn: (e: { expiresAt: number }) => void): () => void;
  on(event: 'error', fn: (e: SwitchboardError) => void): () => void;
  on(event: 'message', fn: (m: ChannelMessage) => void): () => void;
  /** Chat frames of requests this client did not send (another tab of the same user). */
  on(event: 'chat', fn: (f: Record<string, unknown>) => void): () => void;
  on(event: 'join' | 'leave' | 'typing' | 'read', fn: (e: ChannelEvent) => void): () => void;
  off(event: string, fn: (arg: never) => void): void;
  ready(opts?: { timeoutMs?: number }): Promise<SessionInfo>;
  reconnect(): void;
  subscribe(channel: string, handlers?: SubscriptionHandlers, opts?: { since?: number; epoch?: string; backlog?: number }): Subscription;
  publish(channel: string, data: unknown, opts?: { timeoutMs?: number }): Promise<{ offset: number }>;
  presence(channel: string): Promise<PresenceUser[]>;
  typing(channel: string): boolean;
  read(channel: string, offset: number): Promise<{ offset: number }>;
  ping(): Promise<{ rttMs: number }>;
  close(): void;
}

export declare function connect(options: ConnectOptions): Client;
