/**
 * The one data copier: a volume's (or an image's) data into another, moving only what the source
 * allocates, pipelined, checkpointed so that a resumed copy continues where it stopped, with the
 * target's own fast path (BlockDevice.copyFrom: the qcow2 engine's native copy between local
 * files) taking what it can. The broker's host copies, the pool's full clones, `img convert` and
 * the copy into a raw file all run here.
 */
import type { BlockDevice, ByteRange } from '../backend/block-device.js';
import type { JobContext } from '../jobs/job-task.js';
import { Corrupt, InvalidArgument } from '../model/errors.js';
import type { Extent } from '../model/types.js';
import { nonZeroRuns } from './zero-scan.js';

/** Bytes per request: large enough to amortise a round trip, small enough to bound memory. */
export const COPY_CHUNK = 4 * 1024 * 1024;
/** Requests in flight at once (memory bound: DEPTH × COPY_CHUNK). */
export const COPY_DEPTH = 4;
/**
 * Data bytes handed to the target's fast path at once: one checkpoint each (the native helper
 * copies up to 1 GiB per call; fewer calls measured faster, see engine/copy-in.ts).
 */
const FAST_WINDOW = 1024 * 1024 * 1024;

export interface CopyDataOptions {
  /**
   * The target reads as zeros wherever nothing is written (a volume or image made for this copy):
   * holes and zero ranges of the source are skipped, and 4 KiB blocks of zeros inside data are
   * not written (qemu-img's `-S 4k`), so the target stays as sparse as the source. Otherwise
   * every byte of the target is written: data, or zeros where the source has none.
   */
  targetFresh?: boolean;
  /** After the copy, compare SHA-256 checksums of source and target over everything copied. */
  verify?: boolean;
  /** More to save with every checkpoint (a task's own state beside the copier's `offset`). */
  state?: Record<string, unknown>;
  /** Where to start, when the caller keeps its own record of what is copied (default: ctx.resumeFrom's offset). */
  startAt?: number;
  /**
   * Copy only these ranges (sorted; an incremental copy's changes): inside them the target gets
   * the source's data, and zeros where the source has none; outside them it is left alone.
   */
  only?: ByteRange[];
  /** Data bytes the target's fast path takes between checkpoints (default 1 GiB, or about a second's worth under a speed limit). */
  window?: number;
}

export interface CopyResult {
  /** Data bytes moved (read from the source, written to the target, by either path). */
  dataBytes: number;
  /** Bytes made zero on the target without data (zero ranges, holes of an existing target). */
  zeroBytes: number;
  /** Bytes compared after the copy (verify). */
  verifiedBytes: number;
}

interface Piece extends ByteRange { kind: 'data' | 'zero' }

/** The offset a saved checkpoint says everything below is copied; a bad or foreign state means 0. */
export function resumeOffset(state: unknown, size: number, align = 1): number {
  if (typeof state !== 'object' || state === null) return 0;
  const off = (state as { offset?: unknown }).offset;
  if (typeof off !== 'number' || !Number.isSafeInteger(off) || off < 0 || off > size) return 0;
  return off - (off % align);
}

/**
 * Copy `src` into `dst` (the first min(sizes) bytes), reporting progress in data bytes through
 * `ctx` and checkpointing `{ offset }` (everything below is copied); a run with
 * `ctx.resumeFrom` set continues from there. The target is flushed before it resolves.
 */
export async function copyData(src: BlockDevice, dst: BlockDevice, ctx: JobContext, opts: CopyDataOptions = {}): Promise<CopyResult> {
  const fresh = opts.targetFresh === true;
  if (opts.window !== undefined && !(Number.isSafeInteger(opts.window) && opts.window > 0)) {
    throw new InvalidArgument(`copy: window must be a positive whole number of bytes, got ${String(opts.window)}`);
  }
  const size = Math.min(src.sizeBytes, dst.sizeBytes);
  const start = opts.startAt !== undefined ? resumeOffset({ offset: opts.startAt }, size) : resumeOffset(ctx.resumeFrom, size);
  if (opts.only && fresh) throw new InvalidArgument('copy: only applies to a target that already holds data (not targetFresh)');
  const planned = plan(await src.extents(0, size), size, fresh);
  const whole = opts.only ? within(planned, opts.only) : planned;
  ctx.setTotal(dataIn(whole, 0, size));
  if (start > 0) ctx.setProgress(dataIn(whole, 0, start));
  const pieces = clipFrom(whole, start);
  const result: CopyResult = { dataBytes: 0, zeroBytes: 0, verifiedBytes: 0 };
  const mover = new Mover(src, dst, ctx, fresh, size, result, opts.state ?? {}, opts.window);
  if (fresh && dst.copyFrom) await mover.inWindows(pieces);
  else await mover.pipeline(pieces);
  await dst.flush();
  if (opts.verify) {
    // Verifying reads both sides: it counts in the progress (and the speed limit) as a second pass.
    const copied = dataIn(whole, 0, size);
    ctx.setTotal(copied + whole.reduce((n, p) => n + p.length, 0));
    result.verifiedBytes = await verify(src, dst, whole, ctx);
  }
  return result;
}

/** Moves pieces: through the target's fast path in windows, or read and written, COPY_DEPTH at a time. */
class Mover {
  constructor(private readonly src: BlockDevice, private readonly dst: BlockDevice, private readonly ctx: JobContext,
    private readonly fresh: boolean, private readonly size: number, private readonly result: CopyResult,
    private readonly extraState: Record<string, unknown>, private readonly window: number | undefined) {}

  private state(offset: number): Record<string, unknown> {
    return { ...this.extraState, offset };
  }

  /**
   * The fast path a window at a time (FAST_WINDOW, or about a second's worth under a speed limit);
   * what it leaves (edges, compressed data, …) goes through pipeline().
   */
  async inWindows(pieces: Piece[]): Promise<void> {
    let rest = pieces;
    while (rest.length > 0) {
      const most = this.window ?? FAST_WINDOW;
      const limit = this.ctx.speed > 0 ? Math.min(most, Math.max(COPY_CHUNK, this.ctx.speed)) : most;
      const [window, after] = take(rest, limit);
      const bytes = window.reduce((n, p) => n + p.length, 0);
      this.ctx.checkLease();
      const until = this.ctx.leaseUntil;
      const left = await this.dst.copyFrom!(this.src, window.map(({ offset, length }) => ({ offset, length })), until ? { until } : undefined);
      if (left === undefined) return this.pipeline(rest); // it cannot take this source
      const fast = bytes - left.reduce((n, r) => n + r.length, 0);
      this.result.dataBytes += fast;
      await this.pipeline(left.map((r) => ({ ...r, kind: 'data' as const })), fast);
      rest = after;
      await this.ctx.checkpoint(0, this.state(rest.length > 0 ? rest[0]!.offset : this.size));
    }
  }

  /**
   * Read and write the pieces in requests of COPY_CHUNK, COPY_DEPTH in flight; after each, the
   * checkpoint is the lowest offset not yet done (a failed request is never passed over).
   * `already` data bytes were moved by the fast path just before (reported with the first request).
   */
  async pipeline(pieces: Piece[], already = 0): Promise<void> {
    const chunks = split(pieces);
    let pending = already;
    if (chunks.length === 0) {
      if (pending > 0) await this.ctx.checkpoint(pending);
      return;
    }
    const inFlight = new Map<number, Promise<void>>();
    const done = new Set<number>();
    let failure: unknown;
    let next = 0;
    let lowest = 0;
    try {
      while (next < chunks.length || inFlight.size > 0) {
        while (next < chunks.length && inFlight.size < COPY_DEPTH) {
          const i = next++;
          inFlight.set(i, this.move(chunks[i]!).then(
            () => void done.add(i),
            (e: unknown) => {
              failure ??= e;
              inFlight.delete(i);
            },
          ));
        }
        if (inFlight.size > 0) await Promise.race(inFlight.values());
        if (failure !== undefined) throw failure;
        for (const i of [...inFlight.keys()].filter((k) => done.has(k))) {
          inFlight.delete(i);
          while (done.has(lowest)) lowest++;
          const safe = lowest < chunks.length ? chunks[lowest]!.offset : chunks[chunks.length - 1]!.offset + chunks[chunks.length - 1]!.length;
          const c = chunks[i]!;
          await this.ctx.checkpoint((c.kind === 'data' ? c.length : 0) + pending, this.state(safe));
          pending = 0;
        }
      }
    } finally {
      // Never leave a request running behind a failure or a cancel.
      await Promise.allSettled(inFlight.values());
    }
  }

  private async move(c: Piece): Promise<void> {
    // Each write right after a lease check (JobContext.checkLease): the read before it, or the
    // pipeline's wait, may have lasted past the lease (a process stopped by the system).
    if (c.kind === 'zero') {
      this.ctx.checkLease();
      if (this.dst.writeZeroes) await this.dst.writeZeroes(c.offset, c.length);
      else await this.dst.write(c.offset, new Uint8Array(c.length));
      this.result.zeroBytes += c.length;
      return;
    }
    const data = await this.src.read(c.offset, c.length);
    this.ctx.checkLease();
    if (!this.fresh) {
      await this.dst.write(c.offset, data);
    } else {
      // A fresh target already reads as zeros: leave blocks of zeros out.
      for (const [from, to] of nonZeroRuns(data)) {
        this.ctx.checkLease();
        await this.dst.write(c.offset + from, data.subarray(from, to));
      }
    }
    this.result.dataBytes += c.length;
  }
}

/** What to do with each range: copy data, write zeros, or (fresh target) nothing. */
function plan(extents: Extent[], size: number, fresh: boolean): Piece[] {
  const out: Piece[] = [];
  let pos = 0;
  const push = (offset: number, length: number, kind: Piece['kind']) => {
    const last = out[out.length - 1];
    if (last && last.kind === kind && last.offset + last.length === offset) last.length += length;
    else out.push({ offset, length, kind });
  };
  for (const e of [...extents].sort((a, b) => a.offset - b.offset)) {
    const s = Math.max(e.offset, pos);
    const t = Math.min(e.offset + e.length, size);
    if (t <= s) continue;
    if (s > pos && !fresh) push(pos, s - pos, 'zero');
    if (e.kind === 'data' || !fresh) push(s, t - s, e.kind);
    pos = t;
  }
  if (pos < size && !fresh) push(pos, size - pos, 'zero');
  return out;
}

/** The parts of the pieces inside the ranges (both sorted). */
function within(pieces: Piece[], ranges: ByteRange[]): Piece[] {
  const out: Piece[] = [];
  let i = 0;
  for (const r of ranges) {
    const end = r.offset + r.length;
    while (i < pieces.length && pieces[i]!.offset + pieces[i]!.length <= r.offset) i++;
    for (let j = i; j < pieces.length && pieces[j]!.offset < end; j++) {
      const p = pieces[j]!;
      const s = Math.max(p.offset, r.offset);
      const t = Math.min(p.offset + p.length, end);
      if (t > s) out.push({ offset: s, length: t - s, kind: p.kind });
    }
  }
  return out;
}

/** Data bytes of the pieces within [from, to). */
function dataIn(pieces: Piece[], from: number, to: number): number {
  let n = 0;
  for (const p of pieces) if (p.kind === 'data') n += Math.max(0, Math.min(to, p.offset + p.length) - Math.max(from, p.offset));
  return n;
}

/** The pieces from `start` on (a piece that straddles it is cut). */
function clipFrom(pieces: Piece[], start: number): Piece[] {
  const out: Piece[] = [];
  for (const p of pieces) {
    const from = Math.max(p.offset, start);
    if (from < p.offset + p.length) out.push({ offset: from, length: p.offset + p.length - from, kind: p.kind });
  }
  return out;
}

/** The first `limit` bytes of the pieces (a piece that straddles it is cut), and the rest. */
function take(pieces: Piece[], limit: number): [Piece[], Piece[]] {
  const head: Piece[] = [];
  let bytes = 0;
  let i = 0;
  for (; i < pieces.length && bytes < limit; i++) {
    const p = pieces[i]!;
    const n = Math.min(p.length, limit - bytes);
    head.push({ offset: p.offset, length: n, kind: p.kind });
    bytes += n;
    if (n < p.length) return [head, [{ offset: p.offset + n, length: p.length - n, kind: p.kind }, ...pieces.slice(i + 1)]];
  }
  return [head, pieces.slice(i)];
}

/** Pieces cut into parts of at most `max` bytes (requests of COPY_CHUNK by default). */
function split(pieces: Piece[], max = COPY_CHUNK): Piece[] {
  const out: Piece[] = [];
  for (const p of pieces) {
    for (let off = p.offset; off < p.offset + p.length; off += max) {
      out.push({ offset: off, length: Math.min(max, p.offset + p.length - off), kind: p.kind });
    }
  }
  return out;
}

/**
 * Compare checksums of source and target, COPY_CHUNK at a time, over every piece; bytes compared.
 * Where the source has no data the target must read as zeros: there only what the target has
 * allocated is read (as qemu-img compare reads only allocated areas) — what it does not is zeros
 * by the BlockDevice contract, and a sparse volume of 10 GiB is not read whole over the wire.
 */
async function verify(src: BlockDevice, dst: BlockDevice, pieces: Piece[], ctx: JobContext): Promise<number> {
  let compared = 0;
  // Loaded here: node:crypto costs every `offload img` start a few milliseconds.
  const { createHash } = await import('node:crypto');
  const digest = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');
  for (const piece of pieces) {
    const toRead = piece.kind === 'data' ? [piece] : await allocatedIn(dst, piece);
    const read = toRead.reduce((n, r) => n + r.length, 0);
    if (read < piece.length) {
      compared += piece.length - read;
      await ctx.checkpoint(piece.length - read);
    }
    for (const c of split(toRead)) {
      const [a, b] = await Promise.all([c.kind === 'data' ? src.read(c.offset, c.length) : Promise.resolve(new Uint8Array(c.length)), dst.read(c.offset, c.length)]);
      const [da, db] = [digest(a), digest(b)];
      if (da !== db) {
        throw new Corrupt(`verify: the target differs from the source in ${c.length} bytes at offset ${c.offset} after the copy (sha256 ${da.slice(0, 16)}… ≠ ${db.slice(0, 16)}…)`, {
          hint: 'the target or the path to it lost data; copy again, and check the target backend', data: { offset: c.offset, length: c.length },
        });
      }
      compared += c.length;
      await ctx.checkpoint(c.length);
    }
  }
  return compared;
}

/** The target's data extents within a zero piece (clipped to it), as zero pieces: what verify must read there. */
async function allocatedIn(dst: BlockDevice, p: Piece): Promise<Piece[]> {
  const out: Piece[] = [];
  for (const e of await dst.extents(p.offset, p.length)) {
    if (e.kind !== 'data') continue;
    const s = Math.max(e.offset, p.offset);
    const t = Math.min(e.offset + e.length, p.offset + p.length);
    if (t > s) out.push({ offset: s, length: t - s, kind: 'zero' });
  }
  return out;
}
