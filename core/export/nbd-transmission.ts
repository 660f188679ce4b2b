/**
 * The transmission phase of one connection: requests are read one after another and served
 * concurrently (replies may go out of order, each written whole); at most MAX_IN_FLIGHT requests
 * and the server's byte budget of payloads are outstanding, so a fast client is held back by TCP.
 * A write is answered once the device took it (FUA: once durable — the device's writeFua, or
 * write then flush); FLUSH covers every write answered before it, since it flushes the same
 * device; DISC (or a vanished client) stops reading, lets what is in flight finish, then closes.
 */
import type { Socket } from 'node:net';
import type { BlockDevice, ByteRange } from '../backend/block-device.js';
import { OffloadError } from '../model/errors.js';
import type { Extent } from '../model/types.js';
import type { Budget } from './budget.js';
import type { BufferPool } from './buffer-pool.js';
import { PeerGone, type ByteReader } from './byte-reader.js';
import { ProtocolViolation, type Session } from './nbd-handshake.js';
import {
  ALLOWED_FLAGS, CMD, CMD_FLAG, CONTEXT_ALLOCATION, CONTEXT_BITMAP_PREFIX, CONTEXT_DEPTH, ERR, LIMITS, REPLY, REPLY_FLAG_DONE,
  REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STATE, STATE_DIRTY, STRUCTURED_REPLY_MAGIC,
} from './nbd-protocol.js';

/** Requests a connection may have outstanding (nbdcopy sends up to 64 at once). */
const MAX_IN_FLIGHT = 64;
/** Device reads one READ may make for its data pieces; more pieces are served from one read. */
const MAX_READS_PER_REQUEST = 16;
/** Where a REQ_ONE block status starts looking for the end of its first extent (see blockStatus). */
const FIRST_EXTENT_WINDOW = 8 * 1024 * 1024;
/** Zeros written at a time where a device cannot zero a range itself. */
const ZERO_CHUNK = 1024 * 1024;

interface Request { flags: number; type: number; cookie: Buffer; offset: number; length: number }

/** What a selected meta context reports: allocation, chain depth, or one dirty bitmap. */
type ContextKind = { kind: 'allocation' } | { kind: 'depth' } | { kind: 'bitmap'; bitmap: string };

function contextKind(name: string): ContextKind {
  if (name === CONTEXT_ALLOCATION) return { kind: 'allocation' };
  if (name === CONTEXT_DEPTH) return { kind: 'depth' };
  if (name.startsWith(CONTEXT_BITMAP_PREFIX)) return { kind: 'bitmap', bitmap: name.slice(CONTEXT_BITMAP_PREFIX.length) };
  throw new RequestError(ERR.EINVAL, `meta context ${name} is not served here`); // the handshake selects only those above
}

/** An error to answer a request with (an errno of the protocol) and a message for structured replies. */
class RequestError extends Error {
  constructor(readonly errno: number, message: string) {
    super(message);
  }
}

/** Serve requests until the client disconnects or sends DISC. */
export async function transmit(socket: Socket, reader: ByteReader, session: Session, device: BlockDevice, budget: Budget,
  pool: BufferPool): Promise<void> {
  const conn = new Connection(socket, session, device, budget, pool);
  // Requests in flight are counted, and the loop waits on one promise for a slot to free: a
  // Promise.race over the in-flight set cost a reaction per request in flight for every request
  // read once the limit was reached — nbdcopy keeps exactly 64 in flight, so that was every one.
  let inFlight = 0;
  let failure: { error: unknown } | undefined;
  let wake: (() => void) | undefined;
  const settled = () => {
    inFlight--;
    const w = wake;
    wake = undefined;
    w?.();
  };
  const slotFreed = () => new Promise<void>((r) => { wake = r; });
  try {
    for (;;) {
      let head: Buffer;
      try {
        head = await reader.read(28);
      } catch (e) {
        if (e instanceof PeerGone) break;
        throw e;
      }
      if (head.readUInt32BE(0) !== REQUEST_MAGIC) throw new ProtocolViolation('bad request magic');
      const offset = head.readBigUInt64BE(16);
      const req: Request = {
        flags: head.readUInt16BE(4), type: head.readUInt16BE(6), cookie: Buffer.from(head.subarray(8, 16)),
        offset: offset > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(offset), length: head.readUInt32BE(24),
      };
      if (req.type === CMD.DISC) break;
      let payload: Buffer | undefined;
      let reserved = 0;
      const problem = conn.check(req);
      if (req.type === CMD.WRITE) {
        if (problem && req.length > LIMITS.maxPayload) {
          // More than any client may send: answer, then hang up rather than read it (as qemu-nbd).
          await conn.serve(req, problem, undefined);
          break;
        }
        if (problem) {
          await reader.skip(req.length); // never held in memory: it is refused
        } else {
          reserved = req.length;
          await budget.acquire(reserved);
          payload = await reader.read(req.length);
        }
      } else if (req.type === CMD.READ && !problem) {
        reserved = req.length;
        await budget.acquire(reserved);
      }
      inFlight++;
      conn.serve(req, problem, payload).then(() => {
        budget.release(reserved);
        settled();
      }, (error: unknown) => {
        budget.release(reserved);
        failure ??= { error };
        settled();
      });
      while (inFlight >= MAX_IN_FLIGHT && !failure) await slotFreed();
      if (failure) throw failure.error;
    }
  } finally {
    while (inFlight > 0) await slotFreed();
  }
}

class Connection {
  constructor(private readonly socket: Socket, private readonly session: Session, private readonly device: BlockDevice,
    private readonly budget: Budget, private readonly pool: BufferPool) {}

  private get size(): number {
    return this.session.export.size();
  }

  /** What is wrong with a request before it reaches the device (undefined: nothing). */
  check(r: Request): RequestError | undefined {
    const allowed = ALLOWED_FLAGS[r.type];
    if (allowed === undefined) return new RequestError(ERR.EINVAL, `unknown command ${r.type}`);
    if ((r.flags & ~allowed) !== 0) return new RequestError(ERR.EINVAL, `flags 0x${r.flags.toString(16)} are not valid for command ${r.type}`);
    const exp = this.session.export;
    const writes = r.type === CMD.WRITE || r.type === CMD.WRITE_ZEROES || r.type === CMD.TRIM;
    if (writes && exp.readOnly) return new RequestError(ERR.EPERM, 'the export is read-only');
    if ((r.type === CMD.READ || r.type === CMD.WRITE) && r.length > LIMITS.maxPayload) {
      return new RequestError(this.session.structured ? ERR.EOVERFLOW : ERR.EINVAL, `${r.length} bytes is more than one request may carry (${LIMITS.maxPayload})`);
    }
    if (r.type === CMD.FLUSH) return undefined;
    if (r.offset + r.length > this.size) {
      const past = `${r.offset}+${r.length} is past the end of the export (${this.size} bytes)`;
      return new RequestError(r.type === CMD.WRITE || r.type === CMD.WRITE_ZEROES ? ERR.ENOSPC : ERR.EINVAL, past);
    }
    if (r.type === CMD.BLOCK_STATUS) {
      if (this.session.contexts.size === 0) return new RequestError(ERR.EINVAL, 'no meta context was selected');
      if (r.length === 0) return new RequestError(ERR.EINVAL, 'block status of 0 bytes');
    }
    if (r.type === CMD.READ && (r.flags & CMD_FLAG.DF) && !this.session.structured) return new RequestError(ERR.EINVAL, 'DF needs structured replies');
    return undefined;
  }

  async serve(r: Request, problem: RequestError | undefined, payload: Buffer | undefined): Promise<void> {
    try {
      if (problem) throw problem;
      switch (r.type) {
        case CMD.READ: return await this.read(r);
        case CMD.WRITE:
          if ((r.flags & CMD_FLAG.FUA) && this.device.writeFua) {
            await this.device.writeFua(r.offset, payload!);
          } else {
            await this.device.write(r.offset, payload!);
            if (r.flags & CMD_FLAG.FUA) await this.device.flush();
          }
          return await this.simple(r, 0);
        case CMD.FLUSH:
          await this.device.flush();
          return await this.simple(r, 0);
        case CMD.TRIM:
          if (r.length > 0) await this.device.discard?.(r.offset, r.length);
          if (r.flags & CMD_FLAG.FUA) await this.device.flush();
          return await this.simple(r, 0);
        case CMD.WRITE_ZEROES:
          await this.zero(r);
          if (r.flags & CMD_FLAG.FUA) await this.device.flush();
          return await this.simple(r, 0);
        case CMD.BLOCK_STATUS: return await this.blockStatus(r);
        default: throw new RequestError(ERR.EINVAL, `unknown command ${r.type}`);
      }
    } catch (e) {
      const err = e instanceof RequestError ? e : toRequestError(e);
      if (this.session.structured && (r.type === CMD.READ || r.type === CMD.BLOCK_STATUS)) await this.structuredError(r, err);
      else await this.simple(r, err.errno);
    }
  }

  private async zero(r: Request): Promise<void> {
    const noHole = (r.flags & CMD_FLAG.NO_HOLE) !== 0;
    const fast = (r.flags & CMD_FLAG.FAST_ZERO) !== 0;
    if (r.length === 0) return;
    if (!noHole && this.device.writeZeroes && this.session.export.fastZero) {
      await this.device.writeZeroes(r.offset, r.length);
      return;
    }
    // Zeroing would mean writing zeros: FAST_ZERO asks to be told at once instead.
    if (fast) throw new RequestError(ERR.ENOTSUP, 'zeroing is no faster than writing here');
    for (let p = r.offset; p < r.offset + r.length; p += ZERO_CHUNK) {
      const n = Math.min(ZERO_CHUNK, r.offset + r.length - p);
      await this.budget.acquire(n);
      try {
        await this.device.write(p, new Uint8Array(n));
      } finally {
        this.budget.release(n);
      }
    }
  }

  /** READ: a simple reply with the data, or structured chunks with holes sent as holes (unless DF). */
  private async read(r: Request): Promise<void> {
    // One buffer of the request's length from the pool, whatever the holes: the budget already
    // counts that much, and it goes back to the pool once the socket has written the reply.
    const buf = this.pool.take(r.length);
    try {
      if (!this.session.structured) {
        await this.readInto(buf, r.offset);
        return await this.send([this.simpleHead(r, 0), buf]);
      }
      if (r.length === 0 || (r.flags & CMD_FLAG.DF)) {
        await this.readInto(buf, r.offset);
        return await this.send([this.chunkHead(r, REPLY_FLAG_DONE, REPLY.OFFSET_DATA, 8 + buf.length), u64(r.offset), buf]);
      }
      const pieces = cover(await this.device.extents(r.offset, r.length), r.offset, r.length);
      const at = (p: { offset: number; length: number }) => buf.subarray(p.offset - r.offset, p.offset - r.offset + p.length);
      // Data pieces are read at once (or, when there are many small ones, the whole range in one
      // read); holes and zero ranges go as OFFSET_HOLE (no bytes).
      const data = pieces.filter((p) => p.kind === 'data');
      if (data.length > MAX_READS_PER_REQUEST) await this.readInto(buf, r.offset);
      else await allOrFirstError(data.map((p) => this.readInto(at(p), p.offset)));
      const parts: (Uint8Array | Buffer)[] = [];
      pieces.forEach((p, i) => {
        const last = i === pieces.length - 1 ? REPLY_FLAG_DONE : 0;
        if (p.kind === 'data') {
          parts.push(this.chunkHead(r, last, REPLY.OFFSET_DATA, 8 + p.length), u64(p.offset), at(p));
        } else {
          const hole = Buffer.alloc(12);
          hole.writeBigUInt64BE(BigInt(p.offset), 0);
          hole.writeUInt32BE(p.length, 8);
          parts.push(this.chunkHead(r, last, REPLY.OFFSET_HOLE, 12), hole);
        }
      });
      return await this.send(parts);
    } finally {
      // send() resolved: the socket has written the reply (or is gone); nothing refers to buf.
      this.pool.give(buf);
    }
  }

  /** The device's bytes at `offset` into `buf` (a device without readInto: copied from read()). */
  private async readInto(buf: Uint8Array, offset: number): Promise<void> {
    if (buf.length === 0) return;
    if (this.device.readInto) return this.device.readInto(buf, offset);
    buf.set(await this.device.read(offset, buf.length));
  }

  /** BLOCK_STATUS: one chunk per selected context, equal neighbours merged, at most maxExtents each. */
  private async blockStatus(r: Request): Promise<void> {
    const one = (r.flags & CMD_FLAG.REQ_ONE) !== 0;
    const ids = [...this.session.contexts.keys()].sort((a, b) => a - b);
    const parts: Buffer[] = [];
    for (let k = 0; k < ids.length; k++) {
      const id = ids[k]!;
      const ctx = contextKind(this.session.contexts.get(id)!);
      let list: { length: number; flags: number }[];
      if (!one) {
        list = await this.statusOf(ctx, r.offset, r.length);
      } else {
        // Only the first extent is wanted. qemu-img convert asks so for the whole rest of the
        // device from every offset it reaches, and walking the rest each time made a convert of
        // 1 GiB with 512 extents quadratic: ~1400 walks of up to 16384 clusters, 0.3–0.6 s of
        // our CPU. A window that grows until the first extent ends inside it (or the request
        // does) costs what that extent's length costs, and finds the same extent.
        for (let w = Math.min(r.length, FIRST_EXTENT_WINDOW); ; w = Math.min(r.length, w * 8)) {
          list = await this.statusOf(ctx, r.offset, w);
          if (list.length > 1 || w === r.length) break;
        }
        list = list.slice(0, 1);
      }
      if (list.length > LIMITS.maxExtents) list = list.slice(0, LIMITS.maxExtents);
      const body = Buffer.alloc(4 + 8 * list.length);
      body.writeUInt32BE(id, 0);
      list.forEach((e, i) => {
        body.writeUInt32BE(e.length, 4 + 8 * i);
        body.writeUInt32BE(e.flags >>> 0, 8 + 8 * i);
      });
      parts.push(this.chunkHead(r, k === ids.length - 1 ? REPLY_FLAG_DONE : 0, REPLY.BLOCK_STATUS, body.length), body);
    }
    return this.send(parts);
  }

  /** [offset, offset+length) as extents of one context, equal neighbours merged. */
  private async statusOf(ctx: ContextKind, offset: number, length: number): Promise<{ length: number; flags: number }[]> {
    if (ctx.kind === 'depth') return merge(depthCover(await this.device.allocationDepth!(offset, length), offset, length));
    if (ctx.kind === 'bitmap') return merge(dirtyCover(await this.dirtyExtents(ctx.bitmap, offset, length), offset, length));
    return merge(cover(await this.device.extents(offset, length), offset, length)
      .map((p) => ({ length: p.length, flags: p.kind === 'data' ? 0 : STATE.HOLE | STATE.ZERO })));
  }

  /**
   * A bitmap's dirty ranges, the device's refusal as this request's error: a bitmap the device
   * holds inconsistent (FailedPrecondition) is EIO — its answer cannot be given, the request was
   * fine — and one gone since the handshake (NotFound) EINVAL.
   */
  private async dirtyExtents(bitmap: string, offset: number, length: number): Promise<ByteRange[]> {
    if (typeof this.device.dirtyExtents !== 'function') throw new RequestError(ERR.EINVAL, `the device has no dirty bitmap ${bitmap}`);
    try {
      return await this.device.dirtyExtents(bitmap, offset, length);
    } catch (e) {
      const msg = `dirty bitmap ${bitmap}: ${e instanceof Error ? e.message : String(e)}`;
      if (e instanceof OffloadError && e.code === 'FailedPrecondition') throw new RequestError(ERR.EIO, msg);
      if (e instanceof OffloadError && e.code === 'NotFound') throw new RequestError(ERR.EINVAL, msg);
      throw toRequestError(e);
    }
  }

  private simpleHead(r: Request, errno: number): Buffer {
    const h = Buffer.alloc(16);
    h.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
    h.writeUInt32BE(errno, 4);
    r.cookie.copy(h, 8);
    return h;
  }

  private chunkHead(r: Request, flags: number, type: number, length: number): Buffer {
    const h = Buffer.alloc(20);
    h.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    r.cookie.copy(h, 8);
    h.writeUInt32BE(length, 16);
    return h;
  }

  private simple(r: Request, errno: number): Promise<void> {
    return this.send([this.simpleHead(r, errno)]);
  }

  private structuredError(r: Request, err: RequestError): Promise<void> {
    const msg = Buffer.from(err.message.slice(0, 4096), 'utf8');
    const body = Buffer.alloc(6 + msg.length);
    body.writeUInt32BE(err.errno, 0);
    body.writeUInt16BE(msg.length, 4);
    msg.copy(body, 6);
    return this.send([this.chunkHead(r, REPLY_FLAG_DONE, REPLY.ERROR, body.length), body]);
  }

  /**
   * Write one reply whole (nothing of another reply comes between its parts); resolves once the
   * socket has written it (or is gone). Until then the request stays in flight and keeps its
   * share of the budget, so replies waiting for a slow reader are bounded by MAX_IN_FLIGHT and
   * the budget, and a READ's buffer can go back to the pool when this resolves.
   */
  private send(parts: (Uint8Array | Buffer)[]): Promise<void> {
    if (this.socket.destroyed || parts.length === 0) return Promise.resolve();
    return new Promise<void>((resolve) => {
      this.socket.cork();
      for (let i = 0; i < parts.length - 1; i++) this.socket.write(parts[i]!);
      // Called once everything written before it is written too, or with an error when the
      // socket is destroyed first: either way nothing of this reply is queued any longer.
      this.socket.write(parts[parts.length - 1]!, () => resolve());
      this.socket.uncork();
    });
  }
}

/**
 * Wait for every read into a shared buffer to end, then fail with the first error: the buffer goes
 * back to the pool afterwards, and a read still running into it then would write into another
 * request's reply.
 */
async function allOrFirstError(reads: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(reads);
  const failed = results.find((x) => x.status === 'rejected');
  if (failed) throw failed.reason;
}

function u64(n: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n), 0);
  return b;
}

/** [offset, offset+length) covered in order: the device's extents, gaps as `zero` (unallocated reads as zeros). */
function cover(extents: Extent[], offset: number, length: number): { offset: number; length: number; kind: 'data' | 'zero' }[] {
  const out: { offset: number; length: number; kind: 'data' | 'zero' }[] = [];
  const end = offset + length;
  let p = offset;
  const push = (at: number, len: number, kind: 'data' | 'zero') => {
    const last = out[out.length - 1];
    if (last && last.kind === kind && last.offset + last.length === at) last.length += len;
    else out.push({ offset: at, length: len, kind });
  };
  for (const e of [...extents].sort((a, b) => a.offset - b.offset)) {
    const s = Math.max(e.offset, p);
    const t = Math.min(e.offset + e.length, end);
    if (t <= s) continue;
    if (s > p) push(p, s - p, 'zero');
    push(s, t - s, e.kind);
    p = t;
  }
  if (p < end) push(p, end - p, 'zero');
  return out;
}

/** Depth ranges covering the request (gaps: depth 0, unallocated). */
function depthCover(depths: { offset: number; length: number; depth: number }[], offset: number, length: number): { length: number; flags: number }[] {
  const out: { length: number; flags: number }[] = [];
  const end = offset + length;
  let p = offset;
  for (const d of [...depths].sort((a, b) => a.offset - b.offset)) {
    const s = Math.max(d.offset, p);
    const t = Math.min(d.offset + d.length, end);
    if (t <= s) continue;
    if (s > p) out.push({ length: s - p, flags: 0 });
    out.push({ length: t - s, flags: d.depth });
    p = t;
  }
  if (p < end) out.push({ length: end - p, flags: 0 });
  return out;
}

/**
 * Dirty ranges covering the request: STATE_DIRTY where the bitmap is set, 0 (clean) in the gaps, as
 * qemu-nbd's bitmap_to_extents. The device's ranges are clipped to the request and taken in order;
 * overlaps count once.
 */
function dirtyCover(dirty: ByteRange[], offset: number, length: number): { length: number; flags: number }[] {
  const out: { length: number; flags: number }[] = [];
  const end = offset + length;
  let p = offset;
  for (const d of [...dirty].sort((a, b) => a.offset - b.offset)) {
    const s = Math.max(d.offset, p);
    const t = Math.min(d.offset + d.length, end);
    if (t <= s) continue;
    if (s > p) out.push({ length: s - p, flags: 0 });
    out.push({ length: t - s, flags: STATE_DIRTY });
    p = t;
  }
  if (p < end) out.push({ length: end - p, flags: 0 });
  return out;
}

/** Equal neighbours merged (a length stays within u32: requests are at most 4 GiB − 1). */
function merge(list: { length: number; flags: number }[]): { length: number; flags: number }[] {
  const out: { length: number; flags: number }[] = [];
  for (const e of list) {
    const last = out[out.length - 1];
    if (last && last.flags === e.flags) last.length += e.length;
    else out.push({ ...e });
  }
  return out;
}

/** A device's typed error as the protocol's errno. */
function toRequestError(e: unknown): RequestError {
  const msg = e instanceof Error ? e.message : String(e);
  if (e instanceof OffloadError) {
    switch (e.code) {
      case 'OutOfRange': return new RequestError(ERR.EINVAL, msg);
      case 'InvalidArgument': return new RequestError(ERR.EINVAL, msg);
      case 'FailedPrecondition': case 'PermissionDenied': return new RequestError(ERR.EPERM, msg);
      case 'Unsupported': return new RequestError(ERR.ENOTSUP, msg);
      default: return new RequestError(ERR.EIO, msg);
    }
  }
  return new RequestError(ERR.EIO, msg);
}
