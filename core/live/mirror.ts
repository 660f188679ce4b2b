import type { BlockDevice, ByteRange, IoOptions } from '../backend/block-device.js';
import { isAllZero } from '../copy/zero-scan.js';
import { BufferPool } from '../export/buffer-pool.js';
import { Cancelled, FailedPrecondition, InvalidArgument } from '../model/errors.js';
import { DEFAULT_GRANULARITY, DirtyMap } from './dirty-map.js';
import type { LiveDevice } from './live-device.js';
import { RangeLocks } from './range-locks.js';
import type { WriteIntent } from './write-intent.js';

/**
 * Copies in flight at most, however small (QEMU's mirror: MAX_IN_FLIGHT 16). The bytes in flight
 * are what `concurrency` whole chunks hold: a source whose writes left single granules scattered
 * (a guest's random writes into unallocated space) has them copied several at a time (8 of 64 KiB
 * by default), not 2, each of which waited out its own round trips: bench/live.ts (~1,000 such
 * granules beside 512 MiB of 1 MiB runs, 1 MiB chunks then), ready in 1.73–1.77 s against
 * 1.85–1.93 s (QEMU's mirror, same run: 1.45–1.48 s).
 */
const MAX_COPIES = 16;

export type MirrorMode = 'background' | 'write-blocking';

/**
 * The copier's reads and writes are a bulk copy's: devices that can make them on low-priority
 * threads do (the qcow2 engine with its native helper), so the guest's own I/O is not held up.
 */
const BULK: IoOptions = { background: true };

export interface MirrorOptions {
  /** background: writes are tracked and copied again; write-blocking: a write to the source is written to the target before it is acknowledged. */
  mode?: MirrorMode;
  /** Bytes per dirty bit (default 64 KiB, as QEMU's mirror on qcow2). */
  granularity?: number;
  /**
   * Largest copy at once (default 256 KiB). bench/live.ts, rounds alternating in one run: against
   * 1 MiB, the guest's p50 during the copy was 0.65–0.72 ms against 0.97–1.44 ms in write-blocking
   * mode and 0.39–0.49 against 0.53–0.60 ms in background mode, for a copy ~6 % slower.
   */
  chunkBytes?: number;
  /**
   * Whole chunks in flight (default 2: with 4, a guest's writes during the copy waited about 1.4 ×
   * longer at p50 for a copy about 10 % faster — bench/live.ts, 2-core machine). Smaller runs
   * share the same bytes, up to `maxCopies` at once.
   */
  concurrency?: number;
  /** Copies in flight at most, however small (default MAX_COPIES). */
  maxCopies?: number;
  /** Bytes copied so far, and what is dirty now: for a job's progress. */
  onProgress?(p: { copied: number; dirty: number }): void;
  /** The next copy waits for this (a job's speed limit). */
  throttle?(bytes: number): Promise<void>;
  /** Asked right before each copy's write to the target, after its read: throws when the copier may no longer write (a job's JobContext.checkLease). */
  mayWrite?(): void;
  /**
   * What the first pass copies (default: what the source allocates). A resumed copy whose target
   * already equals a snapshot of the source gives what changed since that snapshot.
   */
  initial?(): Promise<ByteRange[]>;
  /** The source's write-intent record (its guard is the caller's): the copier's ranges are not trimmed from it while copied. */
  intent?: WriteIntent;
}

/**
 * Copies a device in use (a LiveDevice: what an export serves) to a target while it is written,
 * after QEMU's mirror job (block/mirror.c): a dirty map watches the source from the start; the
 * bulk pass marks what is allocated and copies it, writes that land meanwhile are copied again,
 * and once nothing is dirty the mirror is `ready` — and stays in sync while writes go on. Then
 * `pivot` makes the export serve the target (connections stay open), or `stop` leaves the target
 * a point-in-time copy of the source as it was then.
 */
export class Mirror {
  readonly mode: MirrorMode;
  private readonly map: DirtyMap;
  private readonly locks: RangeLocks;
  private readonly chunk: number;
  private readonly concurrency: number;
  private detach: (() => void) | undefined;
  private copied = 0;
  private cursor = 0;
  private running: Promise<void> | undefined;
  private stopped = false;
  private failure: unknown;
  /** Why the loop ended early without failing: the throttle refused (its job was cancelled or stopped). */
  private halted: unknown;
  private readonly idle = new Set<() => void>();
  private readyWaiters: { resolve: () => void; reject: (e: unknown) => void }[] = [];
  private isReady = false;
  /** Read buffers, used again: a new buffer per copy (1 MiB then) kept the garbage collector busy. */
  private readonly buffers: BufferPool;

  constructor(private readonly source: LiveDevice, private readonly target: BlockDevice, private readonly o: MirrorOptions = {}) {
    this.mode = o.mode ?? 'background';
    if (this.mode !== 'background' && this.mode !== 'write-blocking') throw new InvalidArgument(`mirror mode must be background or write-blocking, got ${String(this.mode)}`);
    if (target.sizeBytes < source.sizeBytes) throw new InvalidArgument(`the target (${target.sizeBytes} bytes) is smaller than the source (${source.sizeBytes})`);
    const granularity = o.granularity ?? DEFAULT_GRANULARITY;
    this.map = new DirtyMap(source.sizeBytes, granularity);
    this.locks = new RangeLocks(granularity);
    this.map.onMark = () => this.poke();
    this.chunk = Math.max(granularity, Math.floor((o.chunkBytes ?? 256 << 10) / granularity) * granularity);
    this.concurrency = Math.max(1, o.concurrency ?? 2);
    this.buffers = new BufferPool(this.concurrency * this.chunk);
  }

  /** Bytes copied so far (the bulk pass and every copy again). */
  get bytesCopied(): number {
    return this.copied;
  }

  /** Bytes the target is behind by now. */
  get dirtyBytes(): number {
    return this.map.dirtyBytes;
  }

  get ready(): boolean {
    return this.isReady;
  }

  /** Whether the target is behind on any of these bytes (a copy in flight has cleared its range already). */
  isDirty(offset: number, length: number): boolean {
    return this.map.isDirty(offset, length);
  }

  /** Make what the target was given durable, as bulk I/O (its deferred metadata too). */
  flushTarget(): Promise<void> {
    return this.target.flush(BULK);
  }

  /** Make what the source was written durable (the write-intent record's trim, before it lets a region go). */
  flushSource(): Promise<void> {
    return this.source.flushSource();
  }

  /**
   * Start watching the source, mark what it has allocated, and copy until stopped. The watch is
   * attached before the allocation is read, so a write in between is marked by one or the other.
   */
  async start(): Promise<void> {
    if (this.running || this.stopped || this.detach) throw new FailedPrecondition('a mirror starts once');
    // Watching before anything is awaited: a write let through just before the call (a resumed
    // copy's sources, whose held writes go once their guard is set) is never missed.
    this.detach = this.source.watch(this.map);
    try {
      // Nothing else uses the target until the switch-over, which makes it durable first: its
      // metadata waits in memory meanwhile, so no write into it (a guest's write-blocking write
      // above all) waits for the copier's metadata I/O.
      await this.target.deferMetadata?.(true);
      if (this.mode === 'write-blocking') {
        this.source.setSyncTarget({ device: this.target, locks: this.locks, pending: this.map, onError: () => this.poke() });
      }
      const first = this.o.initial ? await this.o.initial() : await this.source.extents(0, this.source.sizeBytes);
      for (const e of first) this.map.mark(e.offset, e.length);
    } catch (e) {
      this.release();
      throw e;
    }
    this.running = this.loop();
    this.running.catch(() => undefined); // its failure reaches whenReady, pivot and stop
  }

  /** Resolves once the target is in sync (nothing dirty); rejects if the mirror fails or stops first. */
  whenReady(): Promise<void> {
    if (this.isReady) return Promise.resolve();
    if (this.failure !== undefined || this.halted !== undefined) return Promise.reject(this.failure ?? this.halted);
    return new Promise((resolve, reject) => this.readyWaiters.push({ resolve, reject }));
  }

  /**
   * Switch the source's clients to the target: hold their requests, copy what is still dirty,
   * flush the target, run `commit` (where the caller records, durably, that the target is now the
   * authoritative side), then send every request to the target. Returns the old device, for the
   * caller to close. Only once ready.
   */
  async pivot(commit: () => Promise<void> = async () => undefined): Promise<BlockDevice> {
    return (await Mirror.pivotAll([this], commit))[0]!;
  }

  /**
   * Pivot several mirrors (the disks of one VM) all or none: every source is held, every
   * target brought in sync and flushed, then the one `commit`, then every switch. A failure before
   * the commit switches none.
   */
  static async pivotAll(mirrors: Mirror[], commit: () => Promise<void>): Promise<BlockDevice[]> {
    for (const m of mirrors) {
      if (!m.isReady) throw new FailedPrecondition('the mirror is not ready: the target is not in sync yet');
      if (m.stopped) throw new FailedPrecondition('the mirror has stopped');
    }
    // Most of what the targets were given is flushed while clients still run (as bulk I/O: see
    // loop()): the flush under the hold then covers only the last pass (a whole bulk pass in the
    // page cache held writes ~300 ms).
    await Promise.all(mirrors.map((m) => m.target.flush(BULK)));
    const held = async (i: number): Promise<BlockDevice[]> => {
      if (i < mirrors.length) return mirrors[i]!.source.paused(() => held(i + 1));
      await Promise.all(mirrors.map((m) => m.finish()));
      await commit();
      return mirrors.map((m) => m.source.switchTo(m.target));
    };
    return held(0);
  }

  /**
   * Stop copying. With `consistent` (a cancel after ready), first bring the target in sync with
   * the source as it is at this moment (clients held meanwhile): it is then a point-in-time copy,
   * and `atPoint` runs while the clients are still held (a snapshot of the source then names the
   * point the target equals).
   */
  async stop(opts: { consistent?: boolean; atPoint?: () => Promise<void> } = {}): Promise<void> {
    if (opts.consistent && this.isReady && !this.stopped) {
      await this.source.paused(async () => {
        await this.finish();
        if (opts.atPoint) {
          // The point names what the target equals: the source's writes before it must be as durable as the target's copies of them.
          await this.source.flushSource();
          await opts.atPoint();
        }
      });
      return;
    }
    this.stopped = true;
    this.poke();
    await this.running?.catch(() => undefined);
    this.release();
    this.fail(new Cancelled('the mirror was stopped'));
  }

  /**
   * Stop copying for a later resume (the service stops): with the clients held, end the loop,
   * make what the target was given durable (its metadata written through, flushed), run `atPoint`
   * (a snapshot of the source names the point), and return what the target is still behind on at
   * that point — what a resumed copy copies besides what changes after it. A ready mirror first
   * copies what is dirty, as a consistent stop does: its target is a point-in-time copy even if
   * the point cannot be taken.
   */
  async suspend(atPoint: () => Promise<void>): Promise<ByteRange[]> {
    // Never started: its map knows nothing of what the target lacks.
    if (!this.running) throw new FailedPrecondition('the mirror has not started');
    if (this.stopped && this.halted === undefined) throw new FailedPrecondition('the mirror has stopped');
    return this.source.paused(async () => {
      this.stopped = true;
      this.poke();
      await this.running?.catch(() => undefined); // a copy that failed marked its range again
      if (this.isReady && this.failure === undefined) {
        for (let r = this.map.next(0, this.chunk); r; r = this.map.next(r.offset, this.chunk)) await this.copy(r);
      }
      const behind = this.map.ranges();
      await this.target.deferMetadata?.(false);
      // Both sides durable before the point names where they differ: a power loss after it must
      // not leave the source without a write its target holds (a region the point does not name).
      await Promise.all([this.target.flush(), this.source.flushSource()]);
      await atPoint();
      this.release();
      this.fail(new Cancelled('the mirror was suspended'));
      return behind;
    });
  }

  /** With the source paused: end the loop, copy what is dirty, flush the target, detach. */
  private async finish(): Promise<void> {
    this.stopped = true;
    this.poke();
    await this.running;
    if (this.failure !== undefined) throw this.failure;
    // At full speed: the clients are held meanwhile (and a cancelled job's throttle refuses).
    for (let r = this.map.next(0, this.chunk); r; r = this.map.next(r.offset, this.chunk)) await this.copy(r);
    // Written through from now on: the target is about to be served (or left as the copy).
    await this.target.deferMetadata?.(false);
    await this.target.flush();
    this.release();
  }

  private release(): void {
    this.detach?.();
    this.detach = undefined;
    if (this.mode === 'write-blocking') this.source.setSyncTarget(undefined);
  }

  /** Wake the workers waiting for something to copy. */
  private poke(): void {
    for (const w of [...this.idle]) w();
  }

  private fail(e: unknown): void {
    this.failure ??= e;
    for (const w of this.readyWaiters.splice(0)) w.reject(this.failure);
  }

  /**
   * Copy dirty ranges with `maxCopies` workers sharing `concurrency` chunks' worth of bytes in
   * flight; ready when nothing is dirty and nothing in flight.
   */
  private async loop(): Promise<void> {
    let busy = 0;
    let flushing = false;
    const budget = this.concurrency * this.chunk;
    let inFlight = 0;
    const freed: (() => void)[] = [];
    /** Ranges workers have taken and not copied yet: still dirty, so not to be taken again. */
    const claimed = new Set<ByteRange>();
    const nextUnclaimed = (): ByteRange | undefined => {
      for (let tries = 0; tries <= claimed.size; tries++) {
        const r = this.map.next(this.cursor, this.chunk);
        if (!r) return undefined;
        let past = -1;
        for (const c of claimed) if (c.offset < r.offset + r.length && r.offset < c.offset + c.length) past = Math.max(past, c.offset + c.length);
        if (past < 0) return r;
        this.cursor = past >= this.source.sizeBytes ? 0 : past;
      }
      return undefined; // every dirty range is being copied: wait for a write or for those copies
    };
    const worker = async () => {
      while (!this.stopped) {
        const r = nextUnclaimed();
        if (!r) {
          if (busy === 0 && !this.isReady && !flushing) {
            // In sync: flush the target before saying so (as QEMU's mirror does), so that the
            // switch-over's flush has little left — a whole bulk pass in the page cache held
            // write-blocking writes ~300 ms there. Written meanwhile: copied, then flushed again.
            // As bulk I/O: one fdatasync of the whole pass held a guest's write-blocking writes
            // into the target 30–50 ms in half the rounds of bench/live.ts; written back a slice
            // at a time first (the qcow2 engine), none waited 10 ms, for a flush ~30 % longer.
            flushing = true;
            busy++;
            try {
              await this.target.flush(BULK);
            } finally {
              busy--;
              flushing = false;
            }
            if (busy > 0 || this.map.dirtyGranules > 0 || this.stopped) continue;
            this.isReady = true;
            for (const w of this.readyWaiters.splice(0)) w.resolve();
          }
          // Nothing to do: wait for a write to mark something, or a stop.
          await new Promise<void>((resolve) => {
            const done = () => {
              this.idle.delete(done);
              resolve();
            };
            this.idle.add(done);
          });
          continue;
        }
        // Claimed before the throttle is waited for: the other workers take the next range, not this one.
        this.cursor = r.offset + r.length;
        claimed.add(r);
        busy++;
        try {
          if (this.o.throttle) {
            try {
              await this.o.throttle(r.length);
            } catch (e) {
              this.halt(e);
              break;
            }
            if (this.stopped) break;
          }
          // Bytes: a range waits until it fits beside those in flight (one always goes).
          while (inFlight > 0 && inFlight + r.length > budget) await new Promise<void>((res) => freed.push(res));
          inFlight += r.length;
          try {
            await this.copy(r);
          } finally {
            inFlight -= r.length;
            for (const w of freed.splice(0)) w();
          }
        } finally {
          claimed.delete(r);
          busy--;
        }
      }
    };
    const results = await Promise.allSettled(Array.from({ length: Math.max(1, this.o.maxCopies ?? MAX_COPIES) }, () => worker().catch((e: unknown) => {
      // One copy failed: the others stop after theirs.
      this.stopped = true;
      this.poke();
      throw e;
    })));
    const failed = results.find((r) => r.status === 'rejected');
    if (failed) {
      this.fail(failed.reason);
      throw failed.reason;
    }
  }

  /** The throttle refused: end the loop (what is dirty stays dirty, for a last pass). */
  private halt(e: unknown): void {
    this.halted ??= e;
    this.stopped = true;
    this.poke();
    if (!this.isReady) for (const w of this.readyWaiters.splice(0)) w.reject(e);
  }

  /**
   * Copy one range: under its lock (write-blocking writes wait), only its granules that are still
   * dirty (another worker may have copied part of it meanwhile), each run cleared before it is read.
   */
  private async copy(r: ByteRange): Promise<void> {
    await this.locks.run(r.offset, r.length, async () => {
      for (const run of this.map.runsIn(r.offset, r.length)) {
        // Kept in the write-intent record until the target holds it durably (the map is clean meanwhile).
        this.o.intent?.copying(run.offset, run.length);
        try {
          await this.copyRun(run);
        } finally {
          this.o.intent?.end(run.offset, run.length);
        }
      }
    });
  }

  /** One dirty run, under its range lock: cleared, read from the source, written to the target. */
  private async copyRun(run: ByteRange): Promise<void> {
    // Cleared first: a write landing after this marks it again, and the range is copied again.
    this.map.clear(run.offset, run.length);
    const from = this.source.current;
    // Into a buffer of the pool where the device can: the target is done with it once written.
    const buf = from.readInto ? this.buffers.take(run.length) : undefined;
    try {
      const data = buf ?? await from.read(run.offset, run.length, BULK);
      if (buf) await from.readInto!(buf, run.offset, BULK);
      this.o.mayWrite?.();
      if (this.target.writeZeroes && isAllZero(data)) await this.target.writeZeroes(run.offset, run.length);
      else await this.target.write(run.offset, data, BULK);
    } catch (e) {
      // The buffer is not used again: a device that failed may not be done with it.
      this.map.mark(run.offset, run.length);
      throw e;
    }
    if (buf) this.buffers.give(buf);
    this.copied += run.length;
    this.o.onProgress?.({ copied: this.copied, dirty: this.map.dirtyBytes });
  }
}
