import type { ByteRange } from '../backend/block-device.js';
import { InvalidArgument } from '../model/errors.js';

/** A region is at least this large: a guest's writes within one MiB cost one record at most. */
const MIN_REGION = 1 << 20;
/** Regions per disk at most: its record is 2 KiB of bits (about 2.7 KB of base64) whatever its size. */
const MAX_REGIONS = 16384;
/**
 * Trims a region must stay untouched through before it leaves the record, at most: a region
 * written again after it left waits twice as long next time (1, 2, 4 … trims). bench/probe: 4 KiB
 * writes at 200/s, random over 1 GiB, after the copy was in sync — with one trim always, 85 % of
 * the writes waited for a save of the record (p50 0.29 ms against 0.06 ms unguarded, in process).
 */
const MAX_IDLE_TRIMS = 64;
/** What a region written again after it left needs at least (a copied region needs one). */
const FIRST_RETURN_TRIMS = 8;

/** One disk's write-intent record, as a live copy's saved state holds it. */
export interface IntentRecord {
  sizeBytes: number;
  regionBytes: number;
  /** One bit per region, LSB first, base64: set where the target may differ from the source. */
  bits: string;
  /**
   * The ids of the pair's volumes (Volume.id, where their backends give one), named before any
   * region leaves the record: a volume deleted and made again under its name is not the one the
   * record accounts for.
   */
  volumes?: PairIds;
}

/** The backends' ids of a live copy's source and target (Volume.id). */
export interface PairIds {
  source?: string;
  target?: string;
}

/** Where a record's regions are set, as byte ranges within the disk (coalesced, in order). */
export function intentRanges(rec: IntentRecord): ByteRange[] {
  const bits = Buffer.from(rec.bits, 'base64');
  const n = Math.ceil(rec.sizeBytes / rec.regionBytes);
  const out: ByteRange[] = [];
  for (let r = 0; r < n; r++) {
    if ((bits[r >>> 3]! & (1 << (r & 7))) === 0) continue;
    const offset = r * rec.regionBytes;
    const end = Math.min(offset + rec.regionBytes, rec.sizeBytes);
    const last = out[out.length - 1];
    if (last && last.offset + last.length === offset) last.length = end - last.offset;
    else out.push({ offset, length: end - offset });
  }
  return out;
}

/** A record as a stored job holds it, checked against the disk it is for; else InvalidArgument. */
export function checkIntentRecord(value: unknown, sizeBytes: number, ref: string): IntentRecord {
  const r = value as Partial<IntentRecord> | null;
  const ok = r !== null && typeof r === 'object' && r.sizeBytes === sizeBytes && r.regionBytes === regionBytesFor(sizeBytes)
    && typeof r.bits === 'string' && Buffer.from(r.bits, 'base64').length === Math.ceil(Math.ceil(sizeBytes / r.regionBytes) / 8);
  if (!ok) throw new InvalidArgument(`the write-intent record of ${ref}'s live copy does not fit its ${sizeBytes} bytes (was it resized?)`, { ref });
  return r as IntentRecord;
}

/** The region size for a disk: 1 MiB, doubled until the disk has MAX_REGIONS regions at most. */
export function regionBytesFor(sizeBytes: number): number {
  let r = MIN_REGION;
  while (Math.ceil(sizeBytes / r) > MAX_REGIONS) r *= 2;
  return r;
}

/**
 * One disk's write-intent bitmap (md's write-intent bitmap, DRBD's activity log): the regions
 * where the target may differ from the source, kept so that a copy interrupted by a crash goes on
 * from the record instead of from zero. Its rule: a region leaves the record only once the target
 * holds its data durably, and enters it before any write to it lands on the source (the bit
 * first, then the data). A guest writing where it wrote in the last second pays nothing; a write
 * to a region not recorded waits for one save of the record (shared with every write waiting then).
 */
export class WriteIntent {
  readonly regionBytes: number;
  private readonly n: number;
  /** In the next record saved. */
  readonly want: Uint8Array;
  /** In the last record saved. */
  readonly durable: Uint8Array;
  /** Written or copied since the last trim: not trimmed at the next. */
  private readonly touched: Uint8Array;
  /** Trims since the region was last written or copied, and how many it needs before it may leave the record. */
  private readonly idle: Uint8Array;
  private readonly needs: Uint8Array;
  /** Writes and copies in flight. */
  private readonly busy: Uint32Array;
  /** Written on the source since the last flush of the source (that began after the write ended). */
  private readonly unflushed: Uint8Array;
  /** The volumes the record is of, once the target is open (before the first trim): in every record saved from then on. */
  volumes: PairIds | undefined;

  constructor(readonly sizeBytes: number, private readonly log: IntentLog, initial: ByteRange[] | 'all') {
    this.regionBytes = regionBytesFor(sizeBytes);
    this.n = Math.ceil(sizeBytes / this.regionBytes);
    this.want = new Uint8Array(this.n);
    this.durable = new Uint8Array(this.n);
    this.touched = new Uint8Array(this.n);
    this.idle = new Uint8Array(this.n);
    this.needs = new Uint8Array(this.n).fill(1);
    this.busy = new Uint32Array(this.n);
    // At first every region may hold writes the source has not flushed (made before the copy, in
    // flight as the guard was set, or by a runner that died): the first trim flushes the source.
    this.unflushed = new Uint8Array(this.n).fill(1);
    if (initial === 'all') this.want.fill(1);
    else for (const r of initial) this.each(r.offset, r.length, (i) => { this.want[i] = 1; });
  }

  /**
   * A write to the source is about to start: its regions are busy until end(), and it may land
   * once the returned promise resolves (undefined: the record covers it already). Rejects when the
   * record cannot be saved: the write must then not land.
   */
  begin(offset: number, length: number): Promise<void> | undefined {
    let missing = false;
    this.each(offset, length, (i) => {
      this.busy[i]!++;
      this.touched[i] = 1;
      this.unflushed[i] = 1;
      if (this.want[i] === 0 || this.durable[i] === 0) {
        // Written after it left: a region a guest writes is likely written again, so it stays
        // longer next time (8 trims, then twice as long at each return).
        if (this.want[i] === 0) this.needs[i] = Math.min(MAX_IDLE_TRIMS, Math.max(FIRST_RETURN_TRIMS, this.needs[i]! * 2));
        this.want[i] = 1;
        missing = true;
      }
    });
    return missing ? this.log.save() : undefined;
  }

  /** The write (or copy) begun on these bytes has ended, landed or not. */
  end(offset: number, length: number): void {
    this.each(offset, length, (i) => { this.busy[i]!--; });
  }

  /** The copier writes the target here: not trimmed meanwhile (the region is recorded already). */
  copying(offset: number, length: number): void {
    this.each(offset, length, (i) => {
      this.busy[i]!++;
      this.touched[i] = 1;
    });
  }

  /**
   * Regions recorded whose bytes are all in sync by `clean`, idle, and untouched through as many
   * trims as they need (one at first); the trim after this starts now.
   */
  candidates(clean: (offset: number, length: number) => boolean): number[] {
    const out: number[] = [];
    for (let i = 0; i < this.n; i++) {
      if (this.touched[i] === 1) this.idle[i] = 0;
      else if (this.idle[i]! < 255) this.idle[i]!++;
      if (this.want[i] === 1 && this.idle[i]! >= this.needs[i]! && this.busy[i] === 0 && clean(i * this.regionBytes, this.span(i))) out.push(i);
    }
    this.touched.fill(0);
    return out;
  }

  /**
   * Whether any of `candidates` was written on the source since its last flush. If so, the flush
   * about to start covers them: they are marked flushed now, and `flushFailed` marks them again.
   */
  sourceFlush(candidates: number[]): { flushFailed: () => void } | undefined {
    const marked = candidates.filter((i) => this.unflushed[i] === 1);
    if (marked.length === 0) return undefined;
    // Every region with no write in flight: what the flush covers (a write ending later marks it again).
    const covered: number[] = [];
    for (let i = 0; i < this.n; i++) {
      if (this.unflushed[i] === 1 && this.busy[i] === 0) {
        this.unflushed[i] = 0;
        covered.push(i);
      }
    }
    return { flushFailed: () => { for (const i of covered) this.unflushed[i] = 1; } };
  }

  /** After the flushes: those candidates still untouched, idle and clean leave the next record. */
  drop(candidates: number[], clean: (offset: number, length: number) => boolean): boolean {
    let changed = false;
    for (const i of candidates) {
      if (this.touched[i] === 0 && this.busy[i] === 0 && clean(i * this.regionBytes, this.span(i))) {
        this.want[i] = 0;
        changed = true;
      }
    }
    return changed;
  }

  /** The record as the next save writes it. */
  record(): IntentRecord {
    const bits = new Uint8Array(Math.ceil(this.n / 8));
    for (let i = 0; i < this.n; i++) if (this.want[i] === 1) bits[i >>> 3]! |= 1 << (i & 7);
    return { sizeBytes: this.sizeBytes, regionBytes: this.regionBytes, bits: Buffer.from(bits).toString('base64'), ...(this.volumes ? { volumes: this.volumes } : {}) };
  }

  /** Bytes the next record names. */
  get recordedBytes(): number {
    let sum = 0;
    for (let i = 0; i < this.n; i++) if (this.want[i] === 1) sum += this.span(i);
    return sum;
  }

  private span(i: number): number {
    return Math.min(this.regionBytes, this.sizeBytes - i * this.regionBytes);
  }

  private each(offset: number, length: number, fn: (region: number) => void): void {
    if (length <= 0) return;
    const last = Math.min(this.n - 1, Math.floor((offset + length - 1) / this.regionBytes));
    for (let i = Math.floor(offset / this.regionBytes); i <= last; i++) fn(i);
  }
}

/**
 * The write-intent records of the disks of one live copy, saved together (one job record): saves
 * run one at a time, each writing what every disk wants at its start; a write waits for the first
 * save that starts after it asked.
 */
export class IntentLog {
  private readonly disks: WriteIntent[] = [];
  private started = 0;
  private running: Promise<void> | undefined;
  private waiters: { after: number; resolve: () => void; reject: (e: unknown) => void }[] = [];
  private closing: Promise<void> | undefined;
  private dropping: Promise<void> | undefined;
  private freed = false;
  /** Called once the job's record names no write intent any more (its guards can go). */
  onFree: (() => void) | undefined;
  private trimming = false;

  /**
   * `write` saves the records (a job's state); `drop` takes them out of the job's record once
   * nothing more is saved (for when the record that ends the job could not be written).
   */
  constructor(private readonly write: (records: IntentRecord[]) => Promise<void>, private readonly drop: () => Promise<void>) {}

  /** A disk's bitmap; `initial`: where its target may differ from its source now. */
  add(sizeBytes: number, initial: ByteRange[] | 'all'): WriteIntent {
    const d = new WriteIntent(sizeBytes, this, initial);
    this.disks.push(d);
    return d;
  }

  /**
   * Resolves once a save that started after this call has written the records. After close(),
   * once the job's record names no write intent any more: a write may then land unrecorded.
   */
  save(): Promise<void> {
    if (this.closing) return this.afterClose();
    return new Promise<void>((resolve, reject) => {
      this.waiters.push({ after: this.started, resolve, reject });
      this.pump();
    });
  }

  /**
   * Drop from the record the regions in sync and idle since the last trim. `flush` makes them
   * durable first on both sides: on the targets, their copies; on the sources named (`sources[i]`
   * true), the guest's writes to them since the source was last flushed — else a power loss could
   * leave the source without a write its target holds, in a region no record names, and the
   * resumed copy would not see that they differ. Skipped while one runs.
   */
  async trim(flush: (sources: boolean[]) => Promise<void>, clean: (disk: number, offset: number, length: number) => boolean): Promise<void> {
    if (this.trimming || this.closing) return;
    this.trimming = true;
    try {
      const found = this.disks.map((d, i) => d.candidates((o, l) => clean(i, o, l)));
      if (found.every((c) => c.length === 0)) return;
      const sources = this.disks.map((d, i) => d.sourceFlush(found[i]!));
      try {
        await flush(sources.map((x) => x !== undefined));
      } catch (e) {
        for (const x of sources) x?.flushFailed();
        throw e;
      }
      if (this.closing) return;
      let changed = false;
      for (const [i, d] of this.disks.entries()) if (d.drop(found[i]!, (o, l) => clean(i, o, l))) changed = true;
      if (changed) await this.save();
    } finally {
      this.trimming = false;
    }
  }

  /**
   * No intent is saved from now on: after the save in flight, `last` writes the job's record
   * without one (the switch-over's, a stop's points…). Its outcome is returned; writes waiting
   * for a save then go on once it (or, failing it, `drop`) has been written. Closed already:
   * `last` just runs.
   */
  close(last: () => Promise<void>): Promise<void> {
    if (this.closing) {
      const again = last();
      again.then(() => {
        this.closing = Promise.resolve();
        this.free();
      }, () => undefined);
      return again;
    }
    const running = this.running?.catch(() => undefined);
    const done = (async () => {
      await running;
      await last();
    })();
    this.closing = done;
    done.then(() => this.free(), () => undefined);
    for (const w of this.waiters.splice(0)) this.afterClose().then(w.resolve, w.reject);
    return done;
  }

  private free(): void {
    if (this.freed) return;
    this.freed = true;
    this.onFree?.();
  }

  /** Once the record names no intent: the last record, or else `drop`, tried again at each ask while it fails (the store may come back). */
  private afterClose(): Promise<void> {
    return this.closing!.catch(() => {
      this.dropping ??= this.drop().then(() => {
        this.closing = Promise.resolve();
        this.free();
      }).finally(() => {
        this.dropping = undefined;
      });
      return this.dropping;
    });
  }

  private pump(): void {
    if (this.running || this.waiters.length === 0 || this.closing) return;
    const gen = ++this.started;
    const snaps = this.disks.map((d) => ({ d, want: d.want.slice() }));
    const records = this.disks.map((d) => d.record());
    // A region this save leaves out is no longer recorded from now on, whichever save lands last:
    // a write to it waits for the next save, not this one.
    for (const { d, want } of snaps) for (let i = 0; i < want.length; i++) if (want[i] === 0) d.durable[i] = 0;
    this.running = this.write(records).then(() => {
      for (const { d, want } of snaps) d.durable.set(want);
      this.settle(gen, undefined);
    }, (e: unknown) => this.settle(gen, e ?? new Error('the write-intent record was not saved')));
  }

  private settle(gen: number, failure: unknown): void {
    this.running = undefined;
    const done = this.waiters.filter((w) => w.after < gen);
    this.waiters = this.waiters.filter((w) => w.after >= gen);
    for (const w of done) {
      if (failure === undefined) w.resolve();
      else w.reject(failure);
    }
    this.pump();
  }
}
