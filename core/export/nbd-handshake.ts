/**
 * The fixed-newstyle handshake: the server's greeting, the client's flags, then options one at a
 * time until EXPORT_NAME or GO picks an export (or ABORT ends it). Every option a client may send
 * is answered; unknown ones get ERR_UNSUP and negotiation goes on (QEMU ≥ 8.2 sends
 * EXTENDED_HEADERS first and falls back).
 */
import type { Socket } from 'node:net';
import { ByteReader } from './byte-reader.js';
import {
  CONTEXT_ALLOCATION, CONTEXT_BITMAP_PREFIX, CONTEXT_DEPTH, CONTEXT_ID, CONTEXT_WILDCARDS, FLAG, HANDSHAKE, IHAVEOPT, INFO, LIMITS,
  NBDMAGIC, OPT, OPTION_REPLY_MAGIC, REP,
} from './nbd-protocol.js';
import type { NbdTls } from './nbd-tls.js';

/** One export as the protocol sees it. */
export interface ExportView {
  name: string;
  description?: string;
  readOnly: boolean;
  size(): number;
  /** Preferred I/O size (a power of two ≥ 512). */
  preferredBlockSize: number;
  /** Whether `qemu:allocation-depth` can be answered. */
  hasDepth: boolean;
  /**
   * The dirty bitmaps offered as `qemu:dirty-bitmap:NAME` now (the device's, read afresh each
   * call): a connection reads them once, at its first meta-context option for the export, so its
   * context ids stay what it was told.
   */
  bitmaps(): string[];
  /** Whether zeroing is cheaper than writing zeros (FAST_ZERO can be honoured). */
  fastZero: boolean;
  /**
   * Only these TLS clients (NbdTls.upgrade's `client`) may open it; to others it does not exist
   * (ERR_UNKNOWN, left out of LIST), as a tenant's volume to another tenant. Undefined: any client.
   */
  clients?: ReadonlySet<string>;
}

/** What the handshake settled. */
export interface Session {
  export: ExportView;
  structured: boolean;
  /** Selected meta contexts by id (BLOCK_STATUS answers one chunk per entry). */
  contexts: Map<number, string>;
}

/** A meta context an export offers, with its id on this connection. */
interface OfferedContext { id: number; name: string }

/** A client we stop talking to (bad magic, unknown flags, a message that makes no sense). */
export class ProtocolViolation extends Error {}

export interface HandshakeHost {
  /** An export by its name (not the empty one: the handshake picks the default export itself). */
  lookup(name: string): ExportView | undefined;
  list(): ExportView[];
  /** TLS is required (qemu-nbd with --tls-creds): every option but STARTTLS and ABORT is refused until it is up. */
  tls?: NbdTls;
}

/** A connection's socket and its reader: both are replaced when STARTTLS wraps the socket. */
export interface Link { socket: Socket; reader: ByteReader }

/** Run the handshake; resolves with the session, or undefined when the client aborted. */
export async function handshake(link: Link, host: HandshakeHost): Promise<Session | undefined> {
  let { socket, reader } = link;
  const greeting = Buffer.alloc(18);
  greeting.writeBigUInt64BE(NBDMAGIC, 0);
  greeting.writeBigUInt64BE(IHAVEOPT, 8);
  greeting.writeUInt16BE(HANDSHAKE.FIXED_NEWSTYLE | HANDSHAKE.NO_ZEROES, 16);
  socket.write(greeting);
  const clientFlags = (await reader.read(4)).readUInt32BE(0);
  if ((clientFlags & ~(HANDSHAKE.FIXED_NEWSTYLE | HANDSHAKE.NO_ZEROES)) !== 0) throw new ProtocolViolation(`unknown client flags 0x${clientFlags.toString(16)}`);
  if (!(clientFlags & HANDSHAKE.FIXED_NEWSTYLE)) throw new ProtocolViolation('the client does not speak fixed newstyle');
  const noZeroes = (clientFlags & HANDSHAKE.NO_ZEROES) !== 0;
  let structured = false;
  let contexts = new Map<number, string>();
  let contextsFor: string | undefined;
  // What each export offers, read once per connection: a bitmap's context id (2 + its index) must
  // not change between a LIST, the SET and the BLOCK_STATUS requests that use it.
  const offeredBy = new Map<string, OfferedContext[]>();
  const offered = (exp: ExportView): OfferedContext[] => {
    let o = offeredBy.get(exp.name);
    if (!o) offeredBy.set(exp.name, (o = offeredContexts(exp)));
    return o;
  };
  let secured = false;
  /** Who the client is (its names), once TLS is up: an export with `clients` is seen only by those. */
  let clients: string[] = [];
  const mayOpen = (exp: ExportView) => exp.clients === undefined || clients.some((n) => exp.clients!.has(n));
  const lookup = (name: string) => {
    // The default export (the empty name) is the only one this client may open, if only one.
    if (name === '') {
      const open = host.list().filter(mayOpen);
      return open.length === 1 ? open[0] : undefined;
    }
    const exp = host.lookup(name);
    return exp && mayOpen(exp) ? exp : undefined;
  };

  for (;;) {
    const head = await reader.read(16);
    if (head.readBigUInt64BE(0) !== IHAVEOPT) throw new ProtocolViolation('bad option magic');
    const opt = head.readUInt32BE(8);
    const len = head.readUInt32BE(12);
    if (len > LIMITS.maxOptionData) {
      if (len > LIMITS.maxDiscardedOptionData) throw new ProtocolViolation(`option ${opt} carries ${len} bytes`);
      await reader.skip(len);
      if (opt === OPT.EXPORT_NAME) throw new ProtocolViolation('export name too long');
      reply(socket, opt, REP.ERR_TOO_BIG, message(`option data of ${len} bytes is more than this server takes (${LIMITS.maxOptionData})`));
      continue;
    }
    const data = await reader.read(len);
    if (host.tls && !secured && opt !== OPT.STARTTLS && opt !== OPT.ABORT) {
      // proto.md, FORCEDTLS: ERR_TLS_REQD to every other option; EXPORT_NAME has no error reply.
      if (opt === OPT.EXPORT_NAME) throw new ProtocolViolation('EXPORT_NAME before STARTTLS on a server that requires TLS');
      reply(socket, opt, REP.ERR_TLS_REQD, message('this server requires TLS: negotiate STARTTLS first'));
      continue;
    }
    switch (opt) {
      case OPT.STARTTLS: {
        // As QEMU's nbd/server.c: POLICY without credentials, INVALID once TLS is up.
        if (!host.tls) {
          reply(socket, opt, REP.ERR_POLICY, message('TLS is not configured on this server'));
          break;
        }
        if (secured || len !== 0) {
          reply(socket, opt, REP.ERR_INVALID, message(secured ? 'TLS is already up' : 'STARTTLS takes no data'));
          break;
        }
        reply(socket, opt, REP.ACK);
        // The client must wait for the ACK before its ClientHello: anything already here is a violation.
        if (reader.detach() !== 0) throw new ProtocolViolation('data sent after STARTTLS before its reply');
        ({ socket, clients } = await host.tls.upgrade(socket));
        reader = new ByteReader(socket);
        Object.assign(link, { socket, reader });
        secured = true;
        break;
      }
      case OPT.EXPORT_NAME: {
        const exp = lookup(data.toString('utf8'));
        // This option has no error reply: an unknown name ends the connection.
        if (!exp) throw new ProtocolViolation(`no export named ${JSON.stringify(data.toString('utf8'))}`);
        const out = Buffer.alloc(noZeroes ? 10 : 134);
        out.writeBigUInt64BE(BigInt(exp.size()), 0);
        out.writeUInt16BE(transmissionFlags(exp, structured), 8);
        socket.write(out);
        return { export: exp, structured, contexts: contextsFor === exp.name ? contexts : new Map() };
      }
      case OPT.ABORT:
        reply(socket, opt, REP.ACK);
        return undefined;
      case OPT.LIST:
        if (len !== 0) {
          reply(socket, opt, REP.ERR_INVALID, message('LIST takes no data'));
          break;
        }
        for (const e of host.list().filter(mayOpen)) {
          const name = Buffer.from(e.name, 'utf8');
          const desc = Buffer.from(e.description ?? '', 'utf8');
          const payload = Buffer.alloc(4 + name.length + desc.length);
          payload.writeUInt32BE(name.length, 0);
          name.copy(payload, 4);
          desc.copy(payload, 4 + name.length);
          reply(socket, opt, REP.SERVER, payload);
        }
        reply(socket, opt, REP.ACK);
        break;
      case OPT.INFO:
      case OPT.GO: {
        const req = parseInfoRequest(data);
        if (!req) {
          reply(socket, opt, REP.ERR_INVALID, message('malformed INFO/GO request'));
          break;
        }
        const exp = lookup(req.name);
        if (!exp) {
          reply(socket, opt, REP.ERR_UNKNOWN, message(`no export named ${JSON.stringify(req.name)}`));
          break;
        }
        sendInfo(socket, opt, exp, structured, req.infos);
        reply(socket, opt, REP.ACK);
        if (opt === OPT.GO) return { export: exp, structured, contexts: contextsFor === exp.name ? contexts : new Map() };
        break;
      }
      case OPT.STRUCTURED_REPLY:
        if (len !== 0) {
          reply(socket, opt, REP.ERR_INVALID, message('STRUCTURED_REPLY takes no data'));
          break;
        }
        structured = true;
        reply(socket, opt, REP.ACK);
        break;
      case OPT.LIST_META_CONTEXT:
      case OPT.SET_META_CONTEXT: {
        if (!structured) {
          reply(socket, opt, REP.ERR_INVALID, message('meta contexts need structured replies first'));
          break;
        }
        const req = parseContextRequest(data);
        if (!req) {
          reply(socket, opt, REP.ERR_INVALID, message('malformed meta context request'));
          break;
        }
        const exp = lookup(req.exportName);
        if (!exp) {
          reply(socket, opt, REP.ERR_UNKNOWN, message(`no export named ${JSON.stringify(req.exportName)}`));
          break;
        }
        const matched = matchContexts(req.queries, offered(exp), opt === OPT.LIST_META_CONTEXT);
        if (opt === OPT.SET_META_CONTEXT) {
          contexts = new Map(matched.map((c) => [c.id, c.name]));
          contextsFor = exp.name;
        }
        for (const c of matched) {
          const name = Buffer.from(c.name, 'utf8');
          const payload = Buffer.alloc(4 + name.length);
          payload.writeUInt32BE(opt === OPT.SET_META_CONTEXT ? c.id : 0, 0); // LIST: ids are 0
          name.copy(payload, 4);
          reply(socket, opt, REP.META_CONTEXT, payload);
        }
        reply(socket, opt, REP.ACK);
        break;
      }
      default:
        // EXTENDED_HEADERS, PEEK_EXPORT and anything newer: not offered.
        reply(socket, opt, REP.ERR_UNSUP, message(`option ${opt} is not supported by this server`));
    }
  }
}

/**
 * The transmission flags of an export. CAN_MULTI_CONN for writable exports too: every connection
 * to an export works on its one device, so a FLUSH on any of them flushes what all of them wrote.
 */
export function transmissionFlags(exp: ExportView, structured: boolean): number {
  let f = FLAG.HAS_FLAGS | FLAG.SEND_FLUSH | FLAG.SEND_FUA | FLAG.CAN_MULTI_CONN;
  if (structured) f |= FLAG.SEND_DF;
  if (exp.readOnly) f |= FLAG.READ_ONLY;
  else f |= FLAG.SEND_TRIM | FLAG.SEND_WRITE_ZEROES | FLAG.SEND_FAST_ZERO;
  return f;
}

function reply(socket: Socket, opt: number, type: number, data: Buffer = Buffer.alloc(0)): void {
  const head = Buffer.alloc(20);
  head.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  head.writeUInt32BE(opt, 8);
  head.writeUInt32BE(type, 12);
  head.writeUInt32BE(data.length, 16);
  socket.write(data.length > 0 ? Buffer.concat([head, data]) : head);
}

function message(text: string): Buffer {
  return Buffer.from(text, 'utf8');
}

function sendInfo(socket: Socket, opt: number, exp: ExportView, structured: boolean, infos: number[]): void {
  const info = Buffer.alloc(12);
  info.writeUInt16BE(INFO.EXPORT, 0);
  info.writeBigUInt64BE(BigInt(exp.size()), 2);
  info.writeUInt16BE(transmissionFlags(exp, structured), 10);
  reply(socket, opt, REP.INFO, info);
  // Block sizes are always sent (as qemu-nbd does): minimum 1, the device's preferred size, 32 MiB.
  const bs = Buffer.alloc(14);
  bs.writeUInt16BE(INFO.BLOCK_SIZE, 0);
  bs.writeUInt32BE(1, 2);
  bs.writeUInt32BE(exp.preferredBlockSize, 6);
  bs.writeUInt32BE(LIMITS.maxPayload, 10);
  reply(socket, opt, REP.INFO, bs);
  for (const t of new Set(infos)) {
    if (t !== INFO.NAME && t !== INFO.DESCRIPTION) continue;
    const text = Buffer.from(t === INFO.NAME ? exp.name : exp.description ?? '', 'utf8');
    const payload = Buffer.alloc(2 + text.length);
    payload.writeUInt16BE(t, 0);
    text.copy(payload, 2);
    reply(socket, opt, REP.INFO, payload);
  }
}

/** INFO/GO data: u32 name length, name, u16 count, count × u16 info types. */
function parseInfoRequest(data: Buffer): { name: string; infos: number[] } | undefined {
  if (data.length < 6) return undefined;
  const nameLen = data.readUInt32BE(0);
  if (nameLen > LIMITS.maxString || 4 + nameLen + 2 > data.length) return undefined;
  const name = data.toString('utf8', 4, 4 + nameLen);
  const n = data.readUInt16BE(4 + nameLen);
  if (data.length !== 4 + nameLen + 2 + 2 * n) return undefined;
  const infos: number[] = [];
  for (let i = 0; i < n; i++) infos.push(data.readUInt16BE(4 + nameLen + 2 + 2 * i));
  return { name, infos };
}

/** LIST/SET_META_CONTEXT data: u32 export name length, name, u32 query count, (u32 length, query)×. */
function parseContextRequest(data: Buffer): { exportName: string; queries: string[] } | undefined {
  if (data.length < 8) return undefined;
  const nameLen = data.readUInt32BE(0);
  if (nameLen > LIMITS.maxString || 4 + nameLen + 4 > data.length) return undefined;
  const exportName = data.toString('utf8', 4, 4 + nameLen);
  const count = data.readUInt32BE(4 + nameLen);
  let at = 8 + nameLen;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return undefined;
    const qLen = data.readUInt32BE(at);
    if (qLen > LIMITS.maxString || at + 4 + qLen > data.length) return undefined;
    queries.push(data.toString('utf8', at + 4, at + 4 + qLen));
    at += 4 + qLen;
  }
  return at === data.length ? { exportName, queries } : undefined;
}

/**
 * The contexts an export offers, with ids as qemu-nbd gives them: base:allocation 0,
 * qemu:allocation-depth 1 where the device knows its chain, the i-th dirty bitmap 2 + i.
 */
function offeredContexts(exp: ExportView): OfferedContext[] {
  const out: OfferedContext[] = [{ id: CONTEXT_ID.ALLOCATION, name: CONTEXT_ALLOCATION }];
  if (exp.hasDepth) out.push({ id: CONTEXT_ID.DEPTH, name: CONTEXT_DEPTH });
  exp.bitmaps().forEach((b, i) => out.push({ id: CONTEXT_ID.FIRST_BITMAP + i, name: CONTEXT_BITMAP_PREFIX + b }));
  return out;
}

/**
 * The contexts a request names, in the order of `offered` (base, depth, bitmaps, as qemu-nbd
 * answers): exact names; for LIST also `base:`, `qemu:` and `qemu:dirty-bitmap:` as wildcards,
 * and no query at all meaning every context. Unknown queries (an unknown bitmap) are ignored.
 */
function matchContexts(queries: string[], offered: OfferedContext[], list: boolean): OfferedContext[] {
  if (list && queries.length === 0) return offered;
  const hit = new Set<string>();
  for (const q of queries) {
    const wildcard = list && CONTEXT_WILDCARDS.includes(q);
    for (const c of offered) if (q === c.name || (wildcard && c.name.startsWith(q))) hit.add(c.name);
  }
  return offered.filter((c) => hit.has(c.name));
}
