import type { BlockDevice, ByteRange, IoOptions } from '../backend/block-device.js';
import type { Extent } from '../model/types.js';
import { FailedPrecondition } from '../model/errors.js';
import { DirtyMap } from './dirty-map.js';
import { RangeLocks } from './range-locks.js';

/** The background fill's reads and writes: bulk I/O, made where a device can at low priority (a client's own fills are not). */
const BULK: IoOptions = { background: true };

/** A fill in progress, as exports of its target find it (BrokerState.fills). */
export interface FillEntry {
  /** Resolves once the job has its devices open and its record of what is pending (rejects if it ends first). */
  ready: Promise<{ fill: Fill; jobId: string }>;
}

/** What an instant clone's record keeps: the ranges of the target still served from the source. */
export interface FillState {
  granularity: number;
  pending: [offset: number, length: number][];
}

/**
 * An instant clone's target while it fills (after QEMU's copy-on-read and stream over a backing
 * file, with the backing link kept outside the image so that any target — a SAN LUN too — can
 * have one): a granule still pending reads from the source; the filler copies pending granules to
 * the target; a client's write to a pending granule first fills it. The record of what is pending
 * (`save`) is durable before a client write lands on a granule it covers, so that a resumed fill
 * never copies the source over a client's write; and a granule is recorded filled only after its
 * copy is flushed on the target, so that a resumed fill never trusts data that was lost.
 */
export class Fill {
  readonly pending: DirtyMap;
  private readonly locks: RangeLocks;
  /** Granules filled since the last save began: recorded as pending still. */
  private readonly unsaved: DirtyMap;
  private saving: Promise<void> | undefined;
  private source: BlockDevice | undefined;
  private views = 0;
  private closed = false;
  /** How release() asked the target to close. */
  private closing: { writeNothing?: boolean } | undefined;
  /** Set when the fill failed or was cancelled: what its views answer from then on. */
  private ended: Error | undefined;
  /** Bytes copied from the source (by the filler and by client writes to pending granules). */
  copied = 0;

  constructor(
    source: BlockDevice,
    readonly target: BlockDevice,
    state: FillState,
    /** Make a FillState durable (the job's record). */
    private readonly persist: (s: FillState) => Promise<void>,
    /** Keep what a client reads from the source (QEMU's copy-on-read): a range read once is filled. */
    private readonly copyOnRead = false,
  ) {
    this.source = source;
    this.pending = new DirtyMap(target.sizeBytes, state.granularity);
    for (const [o, l] of state.pending) this.pending.mark(o, l);
    this.unsaved = new DirtyMap(target.sizeBytes, state.granularity);
    this.locks = new RangeLocks(state.granularity);
  }

  get done(): boolean {
    return this.pending.dirtyGranules === 0 && this.unsaved.dirtyGranules === 0;
  }

  /**
   * Copy one pending run (or what of it is still pending) from the source; recorded by the next
   * save. `beforeWrite` is asked right before each write to the target, after its read (a job's
   * JobContext.checkLease: it throws once another runner may be filling the target).
   */
  async fillRange(r: ByteRange, beforeWrite?: () => void): Promise<number> {
    return this.locks.run(r.offset, r.length, () => this.copy(r.offset, r.length, BULK, beforeWrite));
  }

  /**
   * Record what is pending now, durably: the target is flushed first (what it was given is
   * then on it), then the record is written. Saves run one at a time; one asked for meanwhile runs
   * once after, for every caller waiting.
   */
  save(): Promise<void> {
    if (this.saving) return this.saving.then(() => this.save(), () => this.save());
    const run = (async () => {
      const state: FillState = { granularity: this.pending.granularity, pending: this.pending.ranges().map((r) => [r.offset, r.length]) };
      const covered = this.unsaved.ranges();
      for (const r of covered) this.unsaved.clear(r.offset, r.length);
      try {
        await this.target.flush();
        await this.persist(state);
      } catch (e) {
        for (const r of covered) this.unsaved.mark(r.offset, r.length);
        throw e;
      }
    })();
    this.saving = run;
    return run.finally(() => { this.saving = undefined; });
  }

  /** The source is no longer needed (nothing pending, all saved): close it. */
  async detachSource(): Promise<void> {
    if (!this.done) throw new FailedPrecondition('the fill is not done: the source is still needed');
    const s = this.source;
    this.source = undefined;
    await s?.close();
  }

  /** A device for an export of the target while it fills: its close leaves the fill's devices open. */
  view(): BlockDevice {
    if (this.closed) throw new FailedPrecondition('the fill has ended');
    this.views++;
    let open = true;
    const live = <T>(fn: () => Promise<T>): Promise<T> => (this.ended ? Promise.reject(this.ended) : fn());
    return {
      sizeBytes: this.target.sizeBytes,
      ...(this.target.blockSize !== undefined ? { blockSize: this.target.blockSize } : {}),
      read: (o, l) => live(() => this.read(o, l)),
      write: (o, d) => live(() => this.write(o, d, false)),
      writeFua: (o, d) => live(() => this.write(o, d, true)),
      writeZeroes: (o, l) => live(async () => {
        await this.ensureFilled(o, l);
        if (this.target.writeZeroes) await this.target.writeZeroes(o, l);
        else await this.target.write(o, new Uint8Array(l));
      }),
      discard: (o, l) => live(async () => {
        await this.ensureFilled(o, l);
        await this.target.discard?.(o, l);
      }),
      extents: (o, l) => live(() => this.extents(o ?? 0, l ?? this.target.sizeBytes - (o ?? 0))),
      flush: () => live(() => this.target.flush()),
      close: async () => {
        if (!open) return;
        open = false;
        this.views--;
        await this.closeIfUnused();
      },
    };
  }

  /**
   * The fill failed or was cancelled: every view answers `why` from now on (its source and target
   * are about to close, a cancelled clone to be deleted), not data from devices going away.
   */
  end(why: Error): void {
    this.ended ??= why;
  }

  /**
   * The job is done with the fill: the devices close once no export uses the target (`opts`:
   * the target's close, writing nothing more when the job's runner lost it).
   */
  async release(opts?: { writeNothing?: boolean }): Promise<void> {
    this.closed = true;
    this.closing = opts;
    await this.closeIfUnused();
  }

  private async closeIfUnused(): Promise<void> {
    if (!this.closed || this.views > 0) return;
    const s = this.source;
    this.source = undefined;
    await Promise.allSettled([s?.close(), this.target.close(this.closing)]);
  }

  private async read(offset: number, length: number): Promise<Uint8Array> {
    if (!this.pending.isDirty(offset, length)) return this.target.read(offset, length);
    if (this.copyOnRead) {
      // Filled first (its record follows with the next save: a read needs nothing durable), then read from the target.
      await this.locks.run(offset, length, () => this.copy(offset, length));
      return this.target.read(offset, length);
    }
    const out = new Uint8Array(length);
    for (const run of this.runs(offset, length)) {
      const from = run.pending ? this.needSource() : this.target;
      out.set(await from.read(run.offset, run.length), run.offset - offset);
    }
    return out;
  }

  private async write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    await this.ensureFilled(offset, data.length);
    if (fua && this.target.writeFua) await this.target.writeFua(offset, data);
    else {
      await this.target.write(offset, data);
      if (fua) await this.target.flush();
    }
  }

  /** Before a client changes a range: its pending granules are filled, and recorded as filled. */
  private async ensureFilled(offset: number, length: number): Promise<void> {
    if (length === 0) return;
    if (this.pending.isDirty(offset, length)) {
      await this.locks.run(offset, length, async () => {
        for (const run of this.runs(offset, length)) if (run.pending) await this.copy(run.offset, run.length); // a client waits: not bulk
      });
    }
    if (this.unsaved.isDirty(offset, length)) await this.save();
  }

  /**
   * Copy the pending granules [offset, offset+length) touches from the source (caller holds their
   * range lock); bytes copied. `io`: the background fill's copies are bulk I/O (see IoOptions).
   */
  private async copy(offset: number, length: number, io?: IoOptions, beforeWrite?: () => void): Promise<number> {
    const g = this.pending.granularity;
    const start = Math.floor(offset / g) * g;
    const end = Math.min(Math.ceil((offset + length) / g) * g, this.target.sizeBytes);
    let n = 0;
    for (const run of this.runs(start, end - start)) {
      if (!run.pending) continue;
      const data = await this.needSource().read(run.offset, run.length, io);
      beforeWrite?.();
      await this.target.write(run.offset, data, io);
      n += run.length;
      this.unsaved.mark(run.offset, run.length);
      this.pending.clear(run.offset, run.length);
    }
    this.copied += n;
    return n;
  }

  private async extents(offset: number, length: number): Promise<Extent[]> {
    const out: Extent[] = [];
    for (const run of this.runs(offset, length)) out.push(...(await (run.pending ? this.needSource() : this.target).extents(run.offset, run.length)));
    return out;
  }

  /** [offset, offset+length) cut where pending changes. */
  private runs(offset: number, length: number): { offset: number; length: number; pending: boolean }[] {
    const out: { offset: number; length: number; pending: boolean }[] = [];
    const g = this.pending.granularity;
    let at = offset;
    const end = offset + length;
    while (at < end) {
      const next = Math.min(end, (Math.floor(at / g) + 1) * g);
      const pending = this.pending.isDirty(at, next - at);
      const last = out[out.length - 1];
      if (last && last.pending === pending) last.length += next - at;
      else out.push({ offset: at, length: next - at, pending });
      at = next;
    }
    return out;
  }

  private needSource(): BlockDevice {
    if (!this.source) throw new FailedPrecondition('the instant clone\'s source is closed while ranges are still pending');
    return this.source;
  }
}
