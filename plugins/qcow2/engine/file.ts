import { open, type FileHandle } from 'node:fs/promises';
import { Corrupt, FailedPrecondition, InternalError, LeaseLost, NotFound, PermissionDenied } from '../../../core/index.js';
import { dataExtents } from './seek-data.js';
import { nativeAddon, type CopyRangesOptions, type NativeAddon } from './native-addon.js';
import { ioBuffer } from '../format/bytes.js';

let nativeCopyOff = false;
/** Tests: the native batch write replaced (a wrapper that records or fails), or null for none. */
let batchOverride: NativeAddon['writeBatch'] | null | undefined;

/** Whether ImageFile.copyIn can run: the native helper is built (and not switched off). */
export function nativeCopyAvailable(): boolean {
  return !nativeCopyOff && nativeAddon() !== null;
}

/** Whether the native copy honours CopyRangesOptions.until (a helper built before it does not). */
export function nativeCopyHonoursUntil(): boolean {
  return nativeCopyAvailable() && nativeAddon()!.copyRangesUntil === true;
}

/** Switch the native copy off (tests of the fallback) or back on. */
export function setNativeCopyEnabled(enabled: boolean): void {
  nativeCopyOff = !enabled;
}

/**
 * Tests: replace the native batch write (native/fileio/writes.c) with `fn` — one that records what
 * it is given, or fails part-way — or with null to run without it; undefined restores the helper's.
 */
export function setNativeWriteBatch(fn: NativeAddon['writeBatch'] | null | undefined): void {
  batchOverride = fn;
}

function nativeWriteBatch(): NativeAddon['writeBatch'] {
  return batchOverride !== undefined ? (batchOverride ?? undefined) : nativeAddon()?.writeBatch;
}

type BackgroundIO = Pick<NativeAddon, 'backgroundRead' | 'backgroundWrite' | 'backgroundSync'>;
/** Tests: the native background reads, writes and syncs replaced (recorded), or null for none. */
let backgroundOverride: BackgroundIO | null | undefined;

/**
 * Tests: replace the native background I/O (native/fileio/bgio.c) with `io` (one that records
 * what goes through it), or with null to run without it; undefined restores the helper's.
 */
export function setNativeBackgroundIO(io: BackgroundIO | null | undefined): void {
  backgroundOverride = io;
}

function backgroundIO(): BackgroundIO | undefined {
  return backgroundOverride !== undefined ? (backgroundOverride ?? undefined) : (nativeAddon() ?? undefined);
}

/** One write of a batch: `data` at file offset `pos`. */
export type WriteOp = readonly [pos: number, data: Uint8Array];

/**
 * The largest write that batch() holds back as a copy: the caller may change its buffer once
 * write() resolved (the metadata caches do), and a copy of 64 KiB costs a few microseconds, far
 * less than the round trip it saves. A larger one is made at once, with everything held before it,
 * in one call: it costs more than a round trip anyway. A `stable` write (guest data) is held as
 * it is, whatever its size.
 */
const HOLD_MAX = 64 * 1024;

/** How an image file is synced (see OpenOptions.cache and OpenOptions.writeBehind). */
export interface SyncMode {
  /** Cache mode `unsafe`: sync() does nothing. */
  skipSync?: boolean;
  /** Start writing back to the device after every WRITE_BEHIND bytes, in the background. */
  writeBehind?: boolean;
}

/**
 * Bytes written between background writebacks. Large enough that the syncs are few, small enough
 * that the device is kept busy while the job goes on copying (measured on a 256 MiB commit: the
 * final fdatasync went from 0.33 s to 0.1–0.2 s).
 */
const WRITE_BEHIND = 32 << 20;

/**
 * Writes larger than this go one at a time (see ImageFile.pending); smaller ones — metadata
 * entries and tables, a guest's 4 KiB write into its cluster — do not wait behind them.
 */
const SMALL_WRITE = 64 * 1024;

/** A write made or waiting: its byte range, whether it is large, and when it has ended. */
interface PendingWrite { start: number; end: number; large: boolean; done: Promise<unknown> }

/** Positional I/O on one image file; short reads past EOF come back zero-filled when allowed. */
export class ImageFile {
  /**
   * The writes not ended yet, in call order. A write waits for every earlier one that overlaps it
   * (the later-called lands last), a large write also for every earlier large one, and a barrier
   * (a durable batch, a copy-in) for all of them. Large writes go one at a time because buffered
   * writes to a file serialize on its inode lock in the kernel anyway (ext4, XFS), and with
   * several in the thread pool the waiters spin on that lock, taking CPU from the one writing: on
   * this project's 2-core machine a stream ran 8 % faster and a convert to raw 35 % faster, with
   * far less spread, one at a time. Small writes do not queue behind them: with every write in one
   * line, a live copy's guest writes and the metadata steps of its allocations waited out the
   * copier's 1 MiB writes queued ahead (write-blocking writes into the target: p50 1.1 ms, of it
   * 0.5 ms in this line and 0.7 ms for a metadata lock whose holders were in it).
   */
  private pending: PendingWrite[] = [];
  private unsynced = 0;
  /** The background writeback running now, if any (at most one at a time). */
  private writingBack: Promise<void> | undefined;
  /** Reads and writes on the native helper's background thread, not settled yet. */
  private readonly background = new Set<Promise<unknown>>();
  /** A failed background writeback: reported by the next sync(), as the kernel would have. */
  private writeBackError: unknown;
  /** The writes batch() holds back, in call order (undefined: no batch is running). */
  private held: WriteOp[] | undefined;
  /** Set when a batch's writes failed part-way: later ones were not made (see batch()). */
  private lost = false;

  private constructor(readonly path: string, private readonly fh: FileHandle, readonly readOnly: boolean,
    private readonly mode: SyncMode = {}) {}

  static async open(path: string, readOnly: boolean, mode: SyncMode = {}): Promise<ImageFile> {
    try {
      return new ImageFile(path, await open(path, readOnly ? 'r' : 'r+'), readOnly, mode);
    } catch (e) {
      throw fileError(e, path, readOnly ? 'open' : 'open for writing');
    }
  }

  static async create(path: string, overwrite: boolean): Promise<ImageFile> {
    try {
      return new ImageFile(path, await open(path, overwrite ? 'w+' : 'wx+'), false);
    } catch (e) {
      throw fileError(e, path, 'create');
    }
  }

  async stat(): Promise<{ size: number; blocks: number }> {
    if (this.held) await this.writeHeld(false);
    const st = await this.fh.stat();
    return { size: st.size, blocks: st.blocks };
  }

  /**
   * The ranges of [start, end) that hold data (lseek SEEK_DATA/SEEK_HOLE); undefined when that
   * cannot be known here (no native helper, or a file system without hole seeking).
   */
  dataExtents(start: number, end: number): [number, number][] | undefined {
    if (this.held?.length) throw new InternalError(`${this.path}: dataExtents during a batch of writes`, { ref: this.path });
    try {
      return dataExtents(this.fh.fd, start, end);
    } catch (e) {
      throw fileError(e, this.path, 'find its data');
    }
  }

  async size(): Promise<number> {
    if (this.held) await this.writeHeld(false);
    return (await this.fh.stat()).size;
  }

  /** Read into a new buffer; bytes past EOF read as zero. */
  async read(pos: number, length: number, background = false): Promise<Uint8Array> {
    const buf = ioBuffer(length);
    await this.readInto(buf, pos, background);
    return buf;
  }

  /**
   * `background`: a bulk copy's read, made on the native helper's low-priority thread where it
   * is built (bgio.c says why), so that it does not hold up the other I/O of the process.
   */
  async readInto(buf: Uint8Array, pos: number, background = false): Promise<number> {
    // In a batch, a read sees what was written before it: what is held back is written first.
    if (this.held) await this.writeHeld(false);
    const bg = background ? backgroundIO()?.backgroundRead : undefined;
    if (bg) return this.tracked(bg(this.fh.fd, buf, pos));
    let done = 0;
    while (done < buf.length) {
      const { bytesRead } = await this.fh.read(buf, done, buf.length - done, pos + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done;
  }

  /** Read exactly; a short read is corruption (metadata that lies past the end of the file). */
  async readExact(pos: number, length: number, what: string): Promise<Uint8Array> {
    const buf = ioBuffer(length);
    const n = await this.readInto(buf, pos);
    if (n < length) {
      throw new Corrupt(`${this.path}: ${what} at offset ${pos} (+${length}) lies past the end of the file`, {
        ref: this.path, hint: 'the image is truncated or damaged; try `qemu-img check -r all` on a copy',
      });
    }
    return buf;
  }

  /**
   * Write `data` at `pos`, in order with this file's other writes. `stable`: the caller changes
   * nothing of `data` before its own call ends (guest data, or a buffer made for this write), so a
   * batch may hold it without a copy. `background`: a bulk copy's write (see readInto).
   */
  async write(pos: number, data: Uint8Array, stable = false, background = false): Promise<void> {
    if (this.readOnly) throw new FailedPrecondition(`${this.path}: opened read-only`, { ref: this.path });
    if (this.held) {
      if (stable) this.held.push([pos, data]);
      else if (data.length > HOLD_MAX) return this.writeHeld(false, [pos, data]);
      else if (data.length > 0) this.held.push([pos, data.slice()]);
      return;
    }
    return this.ordered(pos, pos + data.length, () => this.writeNow(pos, data, background));
  }

  /**
   * Run `fn` (writes to [start, end); a barrier when `end` is Infinity) after the earlier writes it
   * must follow (see `pending`).
   */
  private ordered<T>(start: number, end: number, fn: () => Promise<T>): Promise<T> {
    const large = end - start > SMALL_WRITE;
    const after: Promise<unknown>[] = [];
    for (const p of this.pending) if ((p.start < end && start < p.end) || (large && p.large)) after.push(p.done);
    const run = after.length === 0 ? fn() : Promise.all(after).then(fn);
    const entry: PendingWrite = { start, end, large, done: run.catch(() => {}) };
    this.pending.push(entry);
    void entry.done.then(() => {
      const i = this.pending.indexOf(entry);
      if (i >= 0) this.pending.splice(i, 1);
    });
    return run;
  }

  private async writeNow(pos: number, data: Uint8Array, background: boolean): Promise<void> {
    const bg = background ? backgroundIO()?.backgroundWrite : undefined;
    if (bg) {
      await this.tracked(bg(this.fh.fd, data, pos));
    } else {
      let done = 0;
      while (done < data.length) {
        const { bytesWritten } = await this.fh.write(data, done, data.length - done, pos + done);
        done += bytesWritten;
      }
    }
    this.unsynced += data.length;
    if (this.mode.writeBehind && !this.mode.skipSync && this.unsynced >= WRITE_BEHIND) this.writeBehind();
  }

  /**
   * Copy [srcPos, dstPos, length] triples (`ops`) from `src` into this file with the native
   * helper (native/fileio/copy.c: a reader and a writer thread, blocks that are all zero left
   * out), in order with this file's other writes. With `opts.alloc` (qcow2 targets) dstPos is a
   * guest offset and each non-zero block goes to the next host offset from `alloc`; the result
   * lists [guest, host] pairs. Only when nativeCopyAvailable().
   *
   * `opts.until` (a job's lease, see JobContext.leaseUntil): nothing is written once the clock
   * reaches until[0] — the helper reads it before each piece — and the copy rejects with
   * LeaseLost. Only where nativeCopyHonoursUntil().
   */
  async copyIn(src: ImageFile, ops: Float64Array, opts: CopyRangesOptions): Promise<Float64Array> {
    if (this.readOnly) throw new FailedPrecondition(`${this.path}: opened read-only`, { ref: this.path });
    const addon = nativeCopyAvailable() ? nativeAddon() : null;
    if (!addon) throw new FailedPrecondition(`${this.path}: the native copy helper is not available`, { ref: this.path });
    if (opts.until && addon.copyRangesUntil !== true) throw new FailedPrecondition(`${this.path}: the native copy helper predates opts.until: rebuild it (npm run build:native)`, { ref: this.path });
    if (this.held) await this.writeHeld(false);
    // A barrier: where the blocks land is known only afterwards.
    return this.ordered(0, Infinity, async () => {
      let pairs: Float64Array;
      try {
        if (opts.until && Date.now() >= opts.until[0]!) throw fenced(this.path);
        pairs = await addon.copyRanges(src.fh.fd, this.fh.fd, ops, opts);
      } catch (e) {
        if (e instanceof LeaseLost) throw e;
        if ((e as NodeJS.ErrnoException)?.code === 'ETIMEDOUT' && String((e as Error).message).startsWith('fence')) throw fenced(this.path);
        const read = String((e as Error)?.message).startsWith('read');
        throw fileError(e, read ? src.path : this.path, read ? 'read' : 'write');
      }
      for (let i = 2; i < ops.length; i += 3) this.unsynced += ops[i]!;
      if (this.mode.writeBehind && !this.mode.skipSync && this.unsynced >= WRITE_BEHIND) this.writeBehind();
      return pairs;
    });
  }

  /**
   * Start an fdatasync in the background, so the device writes while the caller goes on (the
   * final sync then has little left to do). One at a time; a failure is kept for sync().
   */
  private writeBehind(): void {
    if (this.writingBack) return;
    this.unsynced = 0;
    this.writingBack = this.fh.datasync()
      .catch((e: unknown) => { this.writeBackError ??= e; })
      .finally(() => { this.writingBack = undefined; });
  }

  /**
   * Write the metadata clusters held dirty in `dirty` (host offset → contents) and empty it;
   * returns what was written, for the caller's cache. Clusters dirtied meanwhile stay for later.
   */
  async writeTables(dirty: Map<number, Uint8Array>): Promise<[number, Uint8Array][]> {
    const tables = [...dirty];
    dirty.clear();
    await Promise.all(tables.map(([off, t]) => this.write(off, t)));
    return tables;
  }

  /**
   * Write the 8-byte entries `indexes` of `table` (an L1 or refcount table held in memory) to its
   * copy at `tableOffset`, one write per run of consecutive indexes.
   */
  async writeEntries(tableOffset: number, table: Uint8Array, indexes: Iterable<number>): Promise<void> {
    const sorted = [...indexes].sort((a, b) => a - b);
    for (let i = 0; i < sorted.length;) {
      let j = i + 1;
      while (j < sorted.length && sorted[j] === sorted[j - 1]! + 1) j++;
      await this.write(tableOffset + sorted[i]! * 8, table.subarray(sorted[i]! * 8, (sorted[j - 1]! + 1) * 8));
      i = j;
    }
  }

  async truncate(len: number): Promise<void> {
    if (this.held) await this.writeHeld(false);
    await this.fh.truncate(len);
  }

  /**
   * Make every write made so far durable. `background`: a bulk copy's flush, with the native
   * helper written back a slice at a time on its low-priority thread, then synced there (bgio.c
   * says why); else (or without the helper) one fdatasync from the thread pool.
   */
  async sync(background = false): Promise<void> {
    // In a batch: what is held back, then the fdatasync, in one call (a barrier stays a barrier).
    if (this.held) return this.writeHeld(true);
    if (this.readOnly || this.mode.skipSync) return;
    const bg = background ? backgroundIO()?.backgroundSync : undefined;
    // Tracked from the call on (close waits for it): the descriptor is used after a wait.
    if (bg) return this.tracked(this.settleWriteBehind().then(() => { this.unsynced = 0; return bg(this.fh.fd); }));
    await this.settleWriteBehind();
    this.unsynced = 0;
    await this.fh.datasync();
  }

  /** Wait for a background writeback; throw what it failed with (once), as an fdatasync would. */
  private async settleWriteBehind(): Promise<void> {
    await this.writingBack;
    const failed = this.writeBackError;
    if (failed !== undefined) {
      this.writeBackError = undefined;
      throw fileError(failed, this.path, 'write back');
    }
  }

  /**
   * Write `ops` in order and, if `durable`, then make them and everything written before them
   * durable (fdatasync; nothing with cache `unsafe`), in order with this file's other writes.
   * With the native helper, when there is more than one write or a sync, that is one thread-pool
   * round trip for all of it (native/fileio/writes.c); without it, one write at a time, then
   * fdatasync. The first failure stops: the writes after it are not made.
   */
  writeBatch(ops: readonly WriteOp[], durable: boolean): Promise<void> {
    if (this.readOnly) return Promise.reject(new FailedPrecondition(`${this.path}: opened read-only`, { ref: this.path }));
    // Durable: a barrier (its fdatasync covers every write called before it). Else the range it spans.
    let start = Infinity;
    let end = -Infinity;
    for (const [pos, d] of ops) {
      start = Math.min(start, pos);
      end = Math.max(end, pos + d.length);
    }
    if (durable || ops.length === 0) [start, end] = [0, Infinity];
    return this.ordered(start, end, () => this.writeOps(ops, durable));
  }

  private async writeOps(ops: readonly WriteOp[], durable: boolean): Promise<void> {
    const sync = durable && !this.mode.skipSync;
    if (ops.length === 0 && !sync) return;
    if (sync) await this.settleWriteBehind();
    const native = nativeWriteBatch();
    if (native && (sync || ops.length > 1)) {
      try {
        await native(this.fh.fd, Float64Array.from(ops, (o) => o[0]), ops.map((o) => o[1]), sync);
      } catch (e) {
        if (this.held && !(Number((e as { done?: unknown }).done) >= ops.length)) this.lost = true;
        throw e;
      }
      for (const [, d] of ops) this.unsynced += d.length;
    } else {
      try {
        for (const [pos, d] of ops) await this.writeNow(pos, d, false);
      } catch (e) {
        if (this.held) this.lost = true;
        throw e;
      }
      if (sync) await this.fh.datasync();
    }
    if (sync) this.unsynced = 0;
    else if (this.mode.writeBehind && !this.mode.skipSync && this.unsynced >= WRITE_BEHIND) this.writeBehind();
  }

  /** In a batch: write what it holds back (then `last`) now, in one call; the batch goes on. */
  private async writeHeld(durable: boolean, last?: WriteOp): Promise<void> {
    if (!this.held) return;
    if (this.lost) {
      // Writes of this batch were not made: none held after them may be, or the file would skip some.
      this.held = [];
      throw new InternalError(`${this.path}: an earlier write of this batch failed`, { ref: this.path });
    }
    if (this.held.length === 0 && !last && !durable) return;
    const ops = this.held;
    this.held = [];
    if (last) ops.push(last);
    await this.writeBatch(ops, durable);
  }

  /**
   * Run `fn`, holding back every write it makes to this file, and make them together: a read,
   * sync() (a barrier: held writes and the fdatasync go in one call) or a write that is neither
   * `stable` nor at most HOLD_MAX writes what is held so far, and when `fn` ends the rest is
   * written, followed by an fdatasync if `durable` — with the native helper, usually all in one
   * thread-pool round trip.
   * The writes and the barriers are made in the order `fn` asked for them, so the file goes through
   * the same states as without a batch. Without the native helper, `fn` runs with its writes made
   * as it goes, then sync() if `durable`.
   *
   * A write held back resolves at once: `fn` goes on as if it were made. If making the writes
   * fails part-way, the file holds the first of them and `fn`'s state in memory is ahead of it:
   * `lost` is called (to read that state back from the file) before the error is thrown. What `fn`
   * wrote before it failed is written too, as it would have been without a batch.
   *
   * The caller keeps every other writer of this file out meanwhile (the image's exclusive lock):
   * their writes would be held back too, and resolve before they are made.
   */
  async batch<T>(fn: () => Promise<T>, durable: boolean, lost: () => Promise<void>): Promise<T> {
    if (this.readOnly) throw new FailedPrecondition(`${this.path}: opened read-only`, { ref: this.path });
    if (this.held) throw new InternalError(`${this.path}: batches of writes do not nest`, { ref: this.path });
    if (!nativeWriteBatch()) {
      const value = await fn();
      if (durable) await this.sync();
      return value;
    }
    this.held = [];
    this.lost = false;
    let out: { value: T } | { error: unknown };
    try {
      out = { value: await fn() };
    } catch (error) {
      out = { error };
    }
    try {
      await this.writeHeld(durable && 'value' in out);
    } catch (error) {
      if ('value' in out) out = { error };
    } finally {
      this.held = undefined;
    }
    if (this.lost) {
      this.lost = false;
      await lost().catch(() => undefined);
    }
    if ('error' in out) throw out.error;
    return out.value;
  }

  async close(): Promise<void> {
    await this.writingBack;
    // The helper's threads use the bare descriptor, which FileHandle does not know is in use:
    // closed under them, it could be reused for another file before their pread or pwrite runs.
    await Promise.allSettled(this.background);
    await this.fh.close();
  }

  /** A background read or write, kept until it settles (see close). */
  private tracked<T>(p: Promise<T>): Promise<T> {
    this.background.add(p);
    const drop = () => this.background.delete(p);
    p.then(drop, drop);
    return p;
  }
}

/** A native copy stopped at its `until`: the lease of the job writing `path` ran out. */
function fenced(path: string): LeaseLost {
  return new LeaseLost(`${path}: the copy stopped writing when its job's lease ran out (another runner may hold the job now)`);
}

export function fileError(e: unknown, path: string, what: string): Error {
  const code = (e as NodeJS.ErrnoException)?.code;
  if (code === 'ENOENT') return new NotFound(`${path}: no such file (${what})`, { ref: path, cause: e });
  if (code === 'EEXIST') return new FailedPrecondition(`${path}: file already exists`, { ref: path, hint: 'remove it or pass overwrite', cause: e });
  if (code === 'EACCES' || code === 'EPERM' || code === 'EROFS') return new PermissionDenied(`${path}: permission denied (${what})`, { ref: path, cause: e });
  if (code === 'EISDIR') return new FailedPrecondition(`${path}: is a directory`, { ref: path, cause: e });
  return new InternalError(`${path}: cannot ${what}: ${(e as Error)?.message ?? e}`, { ref: path, cause: e });
}
