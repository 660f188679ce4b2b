/**
 * HTTP helpers the mock appliances share: request bodies read with a size limit, JSON parsed with
 * a typed error, replies sent with their length, and a server's listen / close life cycle. Each
 * mock keeps its own error envelope: it answers an `HttpError` in its vendor's shape.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

/** An answer: JSON when `body` is a value, raw bytes when it is a Buffer, no body when absent. */
export interface Reply {
  status: number;
  headers?: Record<string, string>;
  body?: unknown;
}

/** A refusal at the HTTP level (body too large, not JSON, bad fault rules) that a mock answers in its own error envelope. */
export class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = 'HttpError';
  }
}

/** The whole body, refused with 413 as soon as it grows past `limit` bytes. */
export async function readBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > limit) throw new HttpError(413, `the request body is larger than ${limit} bytes`);
    parts.push(chunk as Buffer);
  }
  return Buffer.concat(parts);
}

/** The body as JSON; `undefined` when it is empty (each mock decides what that means). */
export function parseJson(body: Buffer): unknown {
  if (body.length === 0) return undefined;
  try {
    return JSON.parse(body.toString('utf8'));
  } catch {
    throw new HttpError(400, 'the request body is not valid JSON');
  }
}

/** Read and discard the body, so that an answer given without handling does not leave it unread. */
export async function drain(req: IncomingMessage): Promise<void> {
  for await (const _ of req) {
    // discard
  }
}

/** Send a reply with its content type and length; a connection already gone is left alone. */
export function sendReply(res: ServerResponse, reply: Reply, jsonType = 'application/json'): void {
  if (res.destroyed) return;
  const headers: Record<string, string> = { ...reply.headers };
  let payload: Buffer | undefined;
  if (Buffer.isBuffer(reply.body)) {
    payload = reply.body;
    headers['content-type'] ??= 'application/octet-stream';
  } else if (reply.body !== undefined) {
    payload = Buffer.from(JSON.stringify(reply.body));
    headers['content-type'] = jsonType;
  }
  if (payload) headers['content-length'] = String(payload.length);
  res.writeHead(reply.status, headers);
  res.end(payload);
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export interface ServeOptions {
  /** 0 picks a free port. */
  port: number;
  host: string;
  /** The mock's answer when its handler throws something unexpected. */
  crash(error: unknown): Reply;
  jsonType?: string;
}

/** A listening mock server. */
export interface HttpService {
  /** `http://host:port` (IPv6 hosts in brackets). */
  readonly url: string;
  readonly port: number;
  readonly server: Server;
  /** Stop listening and drop every open connection (a client mid-request sees a reset). */
  close(): Promise<void>;
}

/** Listen with `handle`; an unexpected error becomes the mock's crash answer, or a dropped connection once headers are out. */
export async function serveHttp(
  handle: (req: IncomingMessage, res: ServerResponse) => Promise<void>,
  opts: ServeOptions,
): Promise<HttpService> {
  const server = createServer((req, res) => {
    handle(req, res).catch((e: unknown) => {
      if (!res.headersSent) sendReply(res, opts.crash(e), opts.jsonType);
      else res.destroy();
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, opts.host, () => resolve());
  });
  const addr = server.address() as AddressInfo;
  const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
  return {
    url: `http://${host}:${addr.port}`,
    port: addr.port,
    server,
    async close() {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      server.closeAllConnections();
      await closed;
    },
  };
}
