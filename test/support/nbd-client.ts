/**
 * A small NBD client for the server's tests: it speaks the handshake and sends requests byte by
 * byte as the test says, so bad input (a wrong magic, a 4 GiB length, a payload cut short) can be
 * sent on purpose. Real clients (qemu-img, qemu-io, nbdinfo, nbdcopy) are the other half of the tests.
 */
import { connect, type Socket } from 'node:net';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import {
  CMD, HANDSHAKE, IHAVEOPT, NBDMAGIC, OPT, OPTION_REPLY_MAGIC, REP, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
} from '../../core/export/nbd-protocol.js';

export interface OptionReply { option: number; type: number; data: Buffer }
export interface Chunk { flags: number; type: number; cookie: bigint; data: Buffer }
export interface Reply { cookie: bigint; error: number; data?: Buffer; chunks?: Chunk[] }

/** Bytes from a socket, read exactly; `closed` once the server hung up. */
export class Wire {
  private buf: Buffer = Buffer.alloc(0);
  private waiter: (() => void) | undefined;
  closed = false;

  constructor(readonly socket: Socket) {
    socket.on('data', (b: Buffer) => {
      this.buf = this.buf.length === 0 ? b : Buffer.concat([this.buf, b]);
      if (this.buf.length > 8 * 1024 * 1024) socket.pause(); // like a real client: what it does not read stays in TCP
      this.wake();
    });
    const end = () => { this.closed = true; this.wake(); };
    socket.on('close', end);
    socket.on('end', end);
    socket.on('error', end);
  }

  static async open(port: number): Promise<Wire> {
    const socket = connect(port, '127.0.0.1');
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    return new Wire(socket);
  }

  async read(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      this.socket.resume();
      if (this.closed) throw new Error(`the server closed the connection (wanted ${n} bytes, had ${this.buf.length})`);
      await new Promise<void>((r) => { this.waiter = r; });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    if (this.buf.length < 8 * 1024 * 1024) this.socket.resume();
    return out;
  }

  /** Resolves true once the server has closed the connection (false if it is still open after `ms`). */
  async waitClosed(ms = 5000): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (!this.closed && Date.now() < deadline) {
      await new Promise<void>((r) => { this.waiter = r; setTimeout(r, 50); });
    }
    return this.closed;
  }

  write(b: Buffer | Uint8Array): void {
    this.socket.write(b);
  }

  close(): void {
    this.socket.destroy();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }
}

/** The server's greeting, then our flags. */
export async function greet(w: Wire, flags = HANDSHAKE.FIXED_NEWSTYLE | HANDSHAKE.NO_ZEROES): Promise<number> {
  const g = await w.read(18);
  if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('bad greeting');
  const f = Buffer.alloc(4);
  f.writeUInt32BE(flags, 0);
  w.write(f);
  return g.readUInt16BE(16);
}

export function option(w: Wire, opt: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): void {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(IHAVEOPT, 0);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(declaredLength >>> 0, 12);
  w.write(Buffer.concat([h, data]));
}

export async function optionReply(w: Wire): Promise<OptionReply> {
  const h = await w.read(20);
  if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new Error('bad option reply magic');
  const len = h.readUInt32BE(16);
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await w.read(len) };
}

/** Option replies up to and including the final one (ACK or an error). */
export async function optionReplies(w: Wire): Promise<OptionReply[]> {
  const out: OptionReply[] = [];
  for (;;) {
    const r = await optionReply(w);
    out.push(r);
    if (r.type === 1 || r.type >= 0x80000000) return out;
  }
}

/** A name as options carry it: u32 length, bytes. */
export function nameData(name: string): Buffer {
  const b = Buffer.from(name, 'utf8');
  const len = Buffer.alloc(4);
  len.writeUInt32BE(b.length, 0);
  return Buffer.concat([len, b]);
}

/** SET_META_CONTEXT data for `name` and the queries. */
export function contextData(name: string, queries: string[]): Buffer {
  const n = Buffer.alloc(4);
  n.writeUInt32BE(queries.length, 0);
  return Buffer.concat([nameData(name), n, ...queries.map(nameData)]);
}

export interface Opened { wire: Wire; size: number; flags: number; structured: boolean }

/** Connect and GO to an export (structured replies and `base:allocation` unless told otherwise). */
export async function openExport(port: number, name: string, o: { structured?: boolean; contexts?: string[] } = {}): Promise<Opened> {
  const w = await Wire.open(port);
  await greet(w);
  const structured = o.structured ?? true;
  if (structured) {
    option(w, OPT.STRUCTURED_REPLY);
    const r = await optionReply(w);
    if (r.type !== 1) throw new Error(`STRUCTURED_REPLY refused: ${r.type}`);
    const contexts = o.contexts ?? ['base:allocation'];
    if (contexts.length > 0) {
      option(w, OPT.SET_META_CONTEXT, contextData(name, contexts));
      await optionReplies(w);
    }
  }
  const go = Buffer.concat([nameData(name), Buffer.from([0, 0])]);
  option(w, OPT.GO, go);
  let size = -1;
  let flags = 0;
  for (const r of await optionReplies(w)) {
    if (r.type === 3 && r.data.readUInt16BE(0) === 0) {
      size = Number(r.data.readBigUInt64BE(2));
      flags = r.data.readUInt16BE(10);
    }
    if (r.type >= 0x80000000) throw new Error(`GO refused: 0x${r.type.toString(16)} ${r.data.subarray(0).toString()}`);
  }
  return { wire: w, size, flags, structured };
}

let nextCookie = 1n;

/** Send one request (length and offset as given, even when absurd). Returns its cookie. */
export function request(w: Wire, type: number, offset: number | bigint, length: number, o: { flags?: number; payload?: Buffer; magic?: number; cookie?: bigint } = {}): bigint {
  const cookie = o.cookie ?? nextCookie++;
  const h = Buffer.alloc(28);
  h.writeUInt32BE(o.magic ?? REQUEST_MAGIC, 0);
  h.writeUInt16BE(o.flags ?? 0, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(cookie, 8);
  h.writeBigUInt64BE(BigInt(offset), 16);
  h.writeUInt32BE(length >>> 0, 24);
  w.write(o.payload ? Buffer.concat([h, o.payload]) : h);
  return cookie;
}

/**
 * The next reply: a simple one (with `readLength` bytes of data when it answers a READ without
 * error) or every chunk of a structured one up to its DONE chunk.
 */
export async function reply(w: Wire, readLength = 0): Promise<Reply> {
  const magic = (await w.read(4)).readUInt32BE(0);
  if (magic === SIMPLE_REPLY_MAGIC) {
    const h = await w.read(12);
    const error = h.readUInt32BE(0);
    const cookie = h.readBigUInt64BE(4);
    return { cookie, error, ...(error === 0 && readLength > 0 ? { data: await w.read(readLength) } : {}) };
  }
  if (magic !== STRUCTURED_REPLY_MAGIC) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
  const chunks: Chunk[] = [];
  let head = await w.read(16);
  for (;;) {
    const c: Chunk = { flags: head.readUInt16BE(0), type: head.readUInt16BE(2), cookie: head.readBigUInt64BE(4), data: await w.read(head.readUInt32BE(12)) };
    chunks.push(c);
    if (c.flags & 1) break;
    const m = (await w.read(4)).readUInt32BE(0);
    if (m !== STRUCTURED_REPLY_MAGIC) throw new Error('a structured reply was interleaved with another kind');
    head = await w.read(16);
    if (head.readBigUInt64BE(4) !== c.cookie) throw new Error('chunks of two replies were interleaved');
  }
  const err = chunks.find((c) => c.type >= 0x8000);
  return { cookie: chunks[0]!.cookie, error: err ? err.data.readUInt32BE(0) : 0, chunks };
}

/** A structured READ reply's bytes, holes filled with zeros. */
export function readData(r: Reply, offset: number, length: number): Buffer {
  if (r.data) return r.data;
  const out = Buffer.alloc(length);
  for (const c of r.chunks ?? []) {
    if (c.type === 1) {
      const at = Number(c.data.readBigUInt64BE(0)) - offset;
      c.data.copy(out, at, 8);
    }
  }
  return out;
}

/** Greet, STARTTLS, then TLS on the socket (the client side): the wire over TLS. */
export async function startTls(port: number, creds: { ca?: Buffer; cert?: Buffer; key?: Buffer; psk?: { identity: string; key: Buffer } }): Promise<{ wire: Wire; tls: TLSSocket }> {
  const raw = await Wire.open(port);
  await greet(raw);
  option(raw, OPT.STARTTLS);
  const ack = await optionReply(raw);
  if (ack.type !== REP.ACK) throw new Error(`STARTTLS was answered ${ack.type}, not ACK`);
  raw.socket.removeAllListeners('data');
  const tls = tlsConnect({
    socket: raw.socket, servername: 'localhost',
    ...(creds.ca ? { ca: creds.ca } : {}), ...(creds.cert ? { cert: creds.cert, key: creds.key } : {}),
    ...(creds.psk ? { ciphers: 'PSK-AES128-GCM-SHA256', maxVersion: 'TLSv1.2' as const, checkServerIdentity: () => undefined, pskCallback: () => ({ identity: creds.psk!.identity, psk: creds.psk!.key }) } : {}),
  });
  await new Promise<void>((resolve, reject) => tls.once('secureConnect', resolve).once('error', reject));
  return { wire: new Wire(tls), tls };
}

/** GO to `name` over a wire; the replies. */
export async function go(w: Wire, name: string): Promise<number[]> {
  option(w, OPT.GO, Buffer.concat([nameData(name), Buffer.from([0, 0])]));
  return (await optionReplies(w)).map((r) => r.type);
}

export { CMD };
