import { Corrupt, FailedPrecondition, InvalidArgument, OutOfRange } from '../../../core/index.js';
import { ioBuffer, setU64, uninitialized, view } from '../format/bytes.js';
import { COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2, MAX_L1_BYTES } from '../format/constants.js';
import {
  COPIED_HI, decodeL1, decodeL2, encodeL1, encodeL2Normal, encodeL2Zero, entryWords, readEntry, writeEntry, type L2Entry,
} from '../format/entries.js';
import { backingFormatOf, encodeHeader, type Header } from '../format/header.js';
import type { SnapshotEntry } from '../format/snapshot-table.js';
import { inflateCluster } from './compressed.js';
import type { ImageFile } from './file.js';
import { mergeStatus } from './status.js';
import { Refcounts } from './refcounts.js';
import { RwLock } from './rwlock.js';
import { TableCache } from './table-cache.js';
import type {
  BlockStatus, ChainEntry, CheckOptions, CheckResult, HeaderInfo, Image, SnapshotOps,
} from './types.js';
import { checkImage } from './check.js';
import { SnapshotManager } from './snapshots.js';

/** A run of guest clusters with the same kind of mapping (and contiguous host offsets). */
interface Run {
  start: number;
  length: number;
  entry: L2Entry;
}

/** Largest single buffer used for zero-filling and copy loops. */
const CHUNK = 1 << 20;
/** L2 tables read at once by a lookup over a large range (prefetchL2). */
const PREFETCH_L2_BYTES = 1 << 20;

export interface Qcow2Parts {
  path: string;
  file: ImageFile;
  header: Header;
  l1: Uint8Array;
  reftable: Uint8Array;
  snapshots: SnapshotEntry[];
  backing: Image | undefined;
  chain: ChainEntry[];
  readOnly: boolean;
  fileSize: number;
  cacheBytes: number;
  /** OpenOptions.deferMetadata. */
  deferMetadata?: boolean;
}

export class Qcow2Image implements Image {
  readonly format = 'qcow2' as const;
  readonly path: string;
  readonly file: ImageFile;
  readonly readOnly: boolean;
  readonly backing: Image | undefined;
  readonly chain: ChainEntry[];
  readonly lock = new RwLock();
  readonly l2cache: TableCache;
  readonly refcounts: Refcounts;
  readonly snapshots: SnapshotOps;
  h: Header;
  l1: Uint8Array;
  snapshotTable: SnapshotEntry[];
  /** Bytes in the file as far as we know (grows with our writes). */
  fileLen: number;
  private closed = false;
  /**
   * Deferred metadata (OpenOptions.deferMetadata): L2 tables and L1 entries changed since the
   * last flushMetadata(), kept here (pinned, whatever the cache evicts) until then.
   */
  private deferring: boolean;
  private readonly dirtyL2 = new Map<number, Uint8Array>();
  private readonly dirtyL1 = new Set<number>();
  /** Dirty metadata beyond which a write flushes it (bounds memory). */
  private readonly dirtyLimit: number;
  /**
   * Deferred mode: allocating writes run under the shared lock so that their data writes overlap.
   * Their metadata steps take `metaLock` (used as a plain mutex); `inflight` holds the guest
   * clusters whose new space is being written, which no other allocating write may touch.
   */
  private readonly metaLock = new RwLock();
  private readonly inflight = new Set<number>();

  constructor(p: Qcow2Parts) {
    this.path = p.path;
    this.file = p.file;
    this.readOnly = p.readOnly;
    this.backing = p.backing;
    this.chain = p.chain;
    this.h = p.header;
    this.l1 = p.l1;
    this.snapshotTable = p.snapshots;
    this.fileLen = p.fileSize;
    this.l2cache = new TableCache(p.cacheBytes / 2);
    this.refcounts = new Refcounts(
      this.file, this.h.clusterBits, this.h.refcountOrder, p.reftable, this.h.refcountTableOffset,
      new TableCache(p.cacheBytes / 2),
      async (offset, clusters) => {
        const b = new Uint8Array(12);
        setU64(view(b), 0, offset);
        view(b).setUint32(8, clusters);
        await this.file.write(48, b);
        this.h.refcountTableOffset = offset;
        this.h.refcountTableClusters = clusters;
      },
      p.fileSize,
    );
    this.refcounts.onZero = (off) => {
      this.l2cache.delete(off);
      this.dirtyL2.delete(off);
    };
    this.snapshots = new SnapshotManager(this);
    this.deferring = p.deferMetadata === true && !p.readOnly;
    this.refcounts.deferring = this.deferring;
    this.dirtyLimit = Math.max(p.cacheBytes / 2, 4 * this.cs);
  }

  // ---- deferred metadata --------------------------------------------------------------------

  /** Write entries [from, to) of an L2 table (now, or at the next flushMetadata()). */
  async writeL2(l2Offset: number, table: Uint8Array, from: number, to: number): Promise<void> {
    if (this.deferring) {
      this.dirtyL2.set(l2Offset, table);
      return;
    }
    await this.file.write(l2Offset + from * 8, table.subarray(from * 8, to * 8));
  }

  /**
   * Write the deferred metadata in crash-safe order: refcount increments, then the L2 tables
   * and L1 entries that reference the new clusters, then the decrements of what they no longer
   * reference. No fdatasync (flush() adds it). Caller holds the exclusive lock.
   */
  async flushMetadataLocked(): Promise<void> {
    if (!this.hasDirtyMetadata()) return;
    await this.refcounts.writeDirty();
    for (const [off, t] of await this.file.writeTables(this.dirtyL2)) this.l2cache.set(off, t);
    const l1 = [...this.dirtyL1];
    this.dirtyL1.clear();
    await this.file.writeEntries(this.h.l1TableOffset, this.l1, l1);
    await this.refcounts.applyDeferredFrees();
    await this.refcounts.writeDirty();
  }

  /** flushMetadataLocked() under the exclusive lock: after it, a killed process loses nothing. */
  async flushMetadata(): Promise<void> {
    this.checkOpen();
    // Nothing dirty: return without waiting for the exclusive lock (a job calls this per chunk,
    // and waiting would stall its read-ahead).
    if (!this.hasDirtyMetadata()) return;
    await this.lock.exclusive(() => this.flushMetadataLocked());
  }

  private hasDirtyMetadata(): boolean {
    return this.deferring && (this.dirtyL2.size > 0 || this.dirtyL1.size > 0 || this.refcounts.hasPending);
  }

  /**
   * Run a structural change (snapshots, check, resize, header rewrites) with every metadata write
   * going straight to the file, as its own ordering assumes. Caller holds the exclusive lock.
   */
  async writeThrough<T>(fn: () => Promise<T>): Promise<T> {
    if (!this.deferring) return fn();
    await this.flushMetadataLocked();
    this.deferring = this.refcounts.deferring = false;
    try {
      return await fn();
    } finally {
      this.deferring = this.refcounts.deferring = true;
    }
  }

  private async flushIfFull(): Promise<void> {
    if (this.deferring && this.dirtyL2.size * this.cs + this.refcounts.dirtyBytes > this.dirtyLimit) await this.flushMetadataLocked();
  }

  get clusterSize(): number { return 1 << this.h.clusterBits; }
  get cs(): number { return 1 << this.h.clusterBits; }
  get l2Entries(): number { return this.cs / 8; }
  get virtualSize(): number { return this.h.size; }
  get l1Size(): number { return this.l1.length / 8; }

  get header(): HeaderInfo {
    const h = this.h;
    const info: HeaderInfo = {
      version: h.version, clusterBits: h.clusterBits, clusterSize: this.cs, virtualSize: h.size,
      cryptMethod: h.cryptMethod, l1Size: h.l1Size, l1TableOffset: h.l1TableOffset,
      refcountTableOffset: h.refcountTableOffset, refcountTableClusters: h.refcountTableClusters,
      nbSnapshots: h.nbSnapshots, snapshotsOffset: h.snapshotsOffset,
      incompatibleFeatures: h.incompatibleFeatures, compatibleFeatures: h.compatibleFeatures,
      autoclearFeatures: h.autoclearFeatures, refcountOrder: h.refcountOrder, refcountBits: 1 << h.refcountOrder,
      headerLength: h.headerLength, compressionType: h.compressionType,
      lazyRefcounts: (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n,
      dirty: (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n,
      corrupt: (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n,
      extendedL2: (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n,
      extensions: h.extensions.map((e) => ({ type: e.type, length: e.data.length })),
    };
    if (h.backingFile !== undefined) info.backingFile = h.backingFile;
    const bf = backingFormatOf(h);
    if (bf !== undefined) info.backingFormat = bf;
    return info;
  }

  // ---- guards -------------------------------------------------------------------------------

  checkOpen(): void {
    if (this.closed) throw new FailedPrecondition(`${this.path}: image is closed`, { ref: this.path });
  }

  checkRange(offset: number, length: number): void {
    this.checkOpen();
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new InvalidArgument(`${this.path}: bad range offset=${offset} length=${length}`, { ref: this.path });
    }
    if (offset + length > this.h.size) {
      throw new OutOfRange(`${this.path}: range ${offset}+${length} is past the end of the image (${this.h.size} bytes)`, {
        ref: this.path, hint: 'resize the image first',
      });
    }
  }

  assertWritable(): void {
    this.checkOpen();
    if (this.readOnly) throw new FailedPrecondition(`${this.path}: image is open read-only`, { ref: this.path, hint: 'open it with readOnly: false' });
  }

  // ---- mapping ------------------------------------------------------------------------------

  async l2Table(l2Offset: number, what = 'L2 table'): Promise<Uint8Array> {
    let t = this.dirtyL2.get(l2Offset) ?? this.l2cache.get(l2Offset);
    if (!t) {
      if (l2Offset % this.cs !== 0) {
        throw new Corrupt(`${this.path}: ${what} at unaligned offset 0x${l2Offset.toString(16)}`, {
          ref: this.path, hint: 'the image is damaged; check it with `qemu-img check`',
        });
      }
      t = await this.file.readExact(l2Offset, this.cs, what);
      this.l2cache.set(l2Offset, t);
    }
    return t;
  }

  async lookup(gc: number): Promise<L2Entry> {
    const l1i = Math.floor(gc / this.l2Entries);
    if (l1i >= this.l1Size) return { kind: 'unallocated', offset: 0, copied: false, reserved: false };
    const [hi, lo] = readEntry(this.l1, l1i);
    const l1e = decodeL1(hi, lo);
    if (l1e.l2Offset === 0) return { kind: 'unallocated', offset: 0, copied: false, reserved: false };
    const t = await this.l2Table(l1e.l2Offset);
    const [h2, l2] = readEntry(t, gc % this.l2Entries);
    return decodeL2(h2, l2, this.h.clusterBits);
  }

  /**
   * Split [offset, offset+length) into runs of one mapping kind (host-contiguous for data).
   * Walks each L2 table in a plain loop: only a table that is not cached costs an await.
   */
  async runs(offset: number, length: number): Promise<Run[]> {
    const out: Run[] = [];
    const cs = this.cs;
    const l2e = this.l2Entries;
    const end = offset + length;
    let cur: Run | undefined;
    const add = (start: number, len: number, e: L2Entry) => {
      const contiguous = cur && cur.entry.kind === e.kind && e.kind !== 'compressed' &&
        cur.entry.copied === e.copied &&
        (e.kind !== 'normal' || cur.entry.offset + (start - cur.start) + (cur.start % cs) === e.offset);
      if (cur && contiguous) {
        cur.length += len;
      } else {
        cur = { start, length: len, entry: e };
        out.push(cur);
      }
    };
    let p = offset;
    while (p < end) {
      const l1i = Math.floor(p / cs / this.l2Entries);
      const sliceEnd = Math.min(end, (l1i + 1) * this.l2Entries * cs);
      const l2Offset = l1i < this.l1Size ? decodeL1(...readEntry(this.l1, l1i)).l2Offset : 0;
      if (l2Offset === 0) {
        // No L2 table: the whole range it would cover is unallocated (one step, not per cluster).
        add(p, sliceEnd - p, { kind: 'unallocated', offset: 0, copied: false, reserved: false });
        p = sliceEnd;
        continue;
      }
      if (!this.l2cache.has(l2Offset) && !this.dirtyL2.has(l2Offset)) await this.prefetchL2(l1i, end);
      const table = await this.l2Table(l2Offset);
      // The table's entries for this slice as [lo, hi] words. The loop runs once per cluster,
      // usually before the JIT has warmed up (a short-lived CLI), so an entry that continues
      // the current run costs only a compare against the raw entry that would continue it
      // (nextHi/nextLo, -1: none can): a run's length is settled when it ends, not per cluster.
      const base = l1i * l2e * cs;
      const i0 = Math.floor(p / cs) - l1i * l2e;
      const words = entryWords(table, i0, Math.ceil(sliceEnd / cs) - l1i * l2e);
      const n = words.length / 2;
      let nextHi = -1;
      let nextLo = -1;
      let step = 0;
      for (let j = 0; j < n; j++) {
        const lo = words[2 * j]!;
        const hi = words[2 * j + 1]!;
        if (lo === nextLo && hi === nextHi) {
          nextLo += step;
          if (nextLo >= 0x1_0000_0000) { // the offset carries into the high word
            nextLo -= 0x1_0000_0000;
            nextHi += 1;
          }
          continue;
        }
        const pos = j === 0 ? p : base + (i0 + j) * cs;
        if (cur) cur.length = pos - cur.start; // everything up to here continued it
        const e = decodeL2(hi, lo, this.h.clusterBits);
        if (this.h.version === 2 && e.kind === 'zero') {
          throw new Corrupt(`${this.path}: zero flag set in a version 2 image (cluster ${Math.floor(pos / cs)})`, { ref: this.path });
        }
        add(pos, Math.min(sliceEnd, base + (i0 + j + 1) * cs) - pos, e);
        nextHi = e.kind === 'compressed' ? -1 : hi;
        step = e.kind === 'normal' ? cs : 0;
        nextLo = lo + step;
        if (nextLo >= 0x1_0000_0000) {
          nextLo -= 0x1_0000_0000;
          nextHi += 1;
        }
      }
      cur!.length = sliceEnd - cur!.start;
      p = sliceEnd;
    }
    return out;
  }

  /**
   * Read the L2 tables for L1 entries l1i… (up to the guest offset `end`) that are not cached,
   * PREFETCH_L2_BYTES of them at once: a lookup over a large range (map, convert) then waits
   * for one round of reads instead of one read per table, which matters most when the file's
   * pages have left the page cache.
   */
  private async prefetchL2(l1i: number, end: number): Promise<void> {
    const last = Math.min(this.l1Size, Math.ceil(end / (this.cs * this.l2Entries)), l1i + Math.max(1, PREFETCH_L2_BYTES / this.cs));
    const wanted: number[] = [];
    for (let i = l1i; i < last; i++) {
      const off = decodeL1(...readEntry(this.l1, i)).l2Offset;
      if (off !== 0 && !this.l2cache.has(off) && !this.dirtyL2.has(off)) wanted.push(off);
    }
    await Promise.all(wanted.map((off) => this.l2Table(off)));
  }

  /** Host offset of guest byte `p` inside a normal run. */
  hostOf(run: Run, p: number): number {
    return run.entry.offset + (p - run.start) + (run.start % this.cs);
  }

  // ---- read ---------------------------------------------------------------------------------

  async read(offset: number, length: number): Promise<Uint8Array> {
    const out = uninitialized(length);
    await this.readInto(out, offset);
    return out;
  }

  async readInto(buf: Uint8Array, offset: number): Promise<void> {
    this.checkRange(offset, buf.length);
    await this.lock.shared(() => this.readLocked(buf, offset));
  }

  /** Fill `out` with the guest bytes at `offset` (every byte is written). */
  async readLocked(out: Uint8Array, offset: number): Promise<void> {
    for (const run of await this.runs(offset, out.length)) {
      const dst = out.subarray(run.start - offset, run.start - offset + run.length);
      switch (run.entry.kind) {
        case 'normal': {
          const host = this.hostOf(run, run.start);
          if (host >= this.fileLen) {
            throw new Corrupt(`${this.path}: data cluster at 0x${run.entry.offset.toString(16)} lies past the end of the file`, {
              ref: this.path, hint: 'the image is truncated or damaged',
            });
          }
          // Past the end of the file reads as zeros (QEMU does the same for a short file).
          const n = await this.file.readInto(dst, host);
          if (n < dst.length) dst.fill(0, n);
          break;
        }
        case 'zero':
          dst.fill(0);
          break;
        case 'unallocated':
          await this.readBacking(dst, run.start);
          break;
        case 'compressed': {
          const data = await this.readCompressed(run.entry);
          const inOff = run.start % this.cs;
          dst.set(data.subarray(inOff, inOff + run.length));
          break;
        }
      }
    }
  }

  /** Fill `dst` from the backing chain; past its end (or with no backing file) with zeros. */
  async readBacking(dst: Uint8Array, guest: number): Promise<void> {
    const b = this.backing;
    const n = b ? Math.max(0, Math.min(dst.length, b.virtualSize - guest)) : 0;
    if (n > 0) await b!.readInto(dst.subarray(0, n), guest);
    if (n < dst.length) dst.fill(0, n);
  }

  async readCompressed(e: L2Entry): Promise<Uint8Array> {
    const off = e.compressedOffset!;
    const len = Math.min(e.compressedBytes!, Math.max(0, this.fileLen - off), 2 * this.cs);
    if (off >= this.fileLen) throw new Corrupt(`${this.path}: compressed cluster at 0x${off.toString(16)} lies past the end of the file`, { ref: this.path });
    const data = await this.file.read(off, len);
    return inflateCluster(data, this.cs, this.path);
  }

  /** The current guest content of one whole cluster (for copy-on-write). */
  private async oldCluster(gc: number, e: L2Entry): Promise<Uint8Array> {
    const buf = ioBuffer(this.cs);
    switch (e.kind) {
      case 'normal': await this.file.readInto(buf, e.offset); break;
      case 'compressed': return this.readCompressed(e);
      case 'zero': break;
      case 'unallocated': await this.readBacking(buf, gc * this.cs); break;
    }
    return buf;
  }

  // ---- write --------------------------------------------------------------------------------

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.assertWritable();
    this.checkRange(offset, data.length);
    if (data.length === 0) return;
    if (await this.lock.shared(() => this.writeInPlace(offset, data))) return;
    // Clusters that are not ours may be freed by this write: only with deferred metadata, where a
    // freed cluster is not reused before the flush (which is exclusive).
    if (this.deferring && await this.writeAllocatingShared(offset, data, (e) => !(e.kind === 'normal' && e.copied))) {
      if (this.dirtyL2.size * this.cs + this.refcounts.dirtyBytes > this.dirtyLimit) await this.lock.exclusive(() => this.flushIfFull());
      return;
    }
    await this.lock.exclusive(async () => {
      await this.writeLocked(offset, data);
      await this.flushIfFull();
    });
  }

  /** Fast path: every cluster is already ours (COPIED) — write without touching metadata. */
  private async writeInPlace(offset: number, data: Uint8Array): Promise<boolean> {
    const runs = await this.runs(offset, data.length);
    if (!runs.every((r) => r.entry.kind === 'normal' && r.entry.copied)) return false;
    for (const r of runs) {
      await this.file.write(this.hostOf(r, r.start), data.subarray(r.start - offset, r.start - offset + r.length));
    }
    return true;
  }

  /**
   * Deferred mode, a write whose clusters (in one L2 table) all need new space: allocate under
   * `metaLock`, write the data with only the shared lock held (other such writes proceed at the
   * same time), then point the L2 entries at it. False when the write does not qualify (mixed
   * clusters, or one that another write is allocating): the caller takes the exclusive path.
   * Safe because every other change of the mapping takes the exclusive lock, and in deferred
   * mode freed clusters are only reused after a flush, which is exclusive too.
   */
  private async writeAllocatingShared(offset: number, data: Uint8Array, qualifies: (e: L2Entry) => boolean): Promise<boolean> {
    const cs = this.cs;
    const gc0 = Math.floor(offset / cs);
    const gcEnd = Math.ceil((offset + data.length) / cs);
    const l1i = Math.floor(gc0 / this.l2Entries);
    if (Math.floor((gcEnd - 1) / this.l2Entries) !== l1i) return false;
    return this.lock.shared(async () => {
      const plan = await this.metaLock.exclusive(async () => {
        for (let g = gc0; g < gcEnd; g++) if (this.inflight.has(g)) return undefined;
        const { table } = await this.l2ForWrite(l1i);
        const olds: L2Entry[] = [];
        for (let g = gc0; g < gcEnd; g++) {
          const e = decodeL2(...readEntry(table, g % this.l2Entries), this.h.clusterBits);
          if (!qualifies(e)) return undefined;
          olds.push(e);
        }
        const host = await this.refcounts.alloc(olds.length);
        for (let g = gc0; g < gcEnd; g++) this.inflight.add(g);
        return { host, olds };
      });
      if (!plan) return false;
      try {
        const { host, olds } = plan;
        const n = olds.length;
        const buf = await this.withOldEdges(gc0, olds, offset, offset + data.length, data);
        await this.file.write(host, buf);
        this.fileLen = Math.max(this.fileLen, host + n * cs);
        await this.metaLock.exclusive(async () => {
          const { offset: l2off, table } = await this.l2ForWrite(l1i);
          const idx0 = gc0 % this.l2Entries;
          for (let i = 0; i < n; i++) writeEntry(table, idx0 + i, ...encodeL2Normal(host + i * cs, true));
          await this.writeL2(l2off, table, idx0, idx0 + n);
          for (const e of olds) await this.release(e);
        });
      } finally {
        for (let g = gc0; g < gcEnd; g++) this.inflight.delete(g);
      }
      return true;
    });
  }

  /**
   * Copy-on-read for the chain jobs: write `data` at `offset` only if every cluster it covers is
   * still unallocated in this image (a guest write meanwhile wins), with the data write
   * overlapping other such writes. Whole clusters only. Works L2 table by L2 table and stops at
   * the first table whose clusters do not all qualify; returns the bytes written from the start
   * (the caller handles the rest cluster by cluster under the exclusive lock).
   */
  async fillUnallocated(offset: number, data: Uint8Array): Promise<number> {
    this.assertWritable();
    this.checkRange(offset, data.length);
    const cs = this.cs;
    if (offset % cs !== 0 || (data.length % cs !== 0 && offset + data.length !== this.h.size)) {
      throw new InvalidArgument(`${this.path}: fillUnallocated needs whole clusters`, { ref: this.path });
    }
    const span = this.l2Entries * cs;
    let p = offset;
    const end = offset + data.length;
    while (p < end) {
      const q = Math.min(end, (Math.floor(p / span) + 1) * span);
      if (!(await this.writeAllocatingShared(p, data.subarray(p - offset, q - offset), (e) => e.kind === 'unallocated'))) break;
      p = q;
    }
    if (this.dirtyL2.size * cs + this.refcounts.dirtyBytes > this.dirtyLimit) await this.lock.exclusive(() => this.flushIfFull());
    return p - offset;
  }

  /**
   * Fill unallocated clusters straight from another file with the native copy (ImageFile.copyIn):
   * `ops` are [srcPos, guest, length] triples over whole clusters (a length may end at the
   * virtual size instead). Clusters that read as all zero stay unallocated; the others get
   * new space in order, from the end of the allocated area.
   * For `convert` into a new image: every cluster must be unallocated (InvalidArgument if not).
   */
  async copyFromFile(src: ImageFile, ops: Float64Array): Promise<void> {
    this.assertWritable();
    const cs = this.cs;
    for (let i = 0; i < ops.length; i += 3) {
      const guest = ops[i + 1]!;
      const len = ops[i + 2]!;
      this.checkRange(guest, len);
      if (guest % cs !== 0 || (len % cs !== 0 && guest + len !== this.h.size)) {
        throw new InvalidArgument(`${this.path}: copyFromFile needs whole clusters`, { ref: this.path });
      }
    }
    if (ops.length === 0) return;
    await this.lock.exclusive(async () => {
      await this.refuseAllocated(ops);
      // Past everything allocated: the native side hands these out in order, and nothing else
      // allocates while the exclusive lock is held. Only what it used is then claimed.
      const host = Math.ceil(Math.max(this.fileLen, this.refcounts.highWater * cs) / cs) * cs;
      // The helper writes each cluster's L2 entry (COPIED: refcount 1) into `entries`, in op
      // order; each op's run of them is then copied into its L2 table(s) at once. Clusters left
      // out (all zero) get entry 0: they were unallocated (refuseAllocated), and stay so.
      let clusters = 0;
      for (let i = 2; i < ops.length; i += 3) clusters += Math.ceil(ops[i]! / cs);
      const entries = new Uint8Array(clusters * 8);
      const pairs = await this.file.copyIn(src, ops, { block: cs, alloc: host, entries, entryHigh: COPIED_HI });
      const used = pairs.length / 2;
      if (used > 0) await this.refcounts.claim(host, used);
      this.fileLen = Math.max(this.fileLen, host + used * cs);
      const l2e = this.l2Entries;
      // The L2 table being filled; awaited only when the ops move on to another (an await per
      // op was ~3 ms of a 512 MiB convert).
      let cur: { l1i: number; offset: number; table: Uint8Array; lo: number; hi: number } | undefined;
      let e = 0; // the next op's first entry
      for (let i = 0; i < ops.length; i += 3) {
        let gc = ops[i + 1]! / cs;
        const end = gc + Math.ceil(ops[i + 2]! / cs);
        while (gc < end) {
          const l1i = Math.floor(gc / l2e);
          const idx = gc - l1i * l2e;
          const n = Math.min(end - gc, l2e - idx);
          if (cur?.l1i !== l1i) {
            if (cur) await this.writeL2(cur.offset, cur.table, cur.lo, cur.hi);
            cur = { l1i, ...(await this.l2ForWrite(l1i)), lo: idx, hi: idx + n };
          }
          cur.table.set(entries.subarray(e * 8, (e + n) * 8), idx * 8);
          cur.lo = Math.min(cur.lo, idx);
          cur.hi = Math.max(cur.hi, idx + n);
          e += n;
          gc += n;
        }
      }
      if (cur) await this.writeL2(cur.offset, cur.table, cur.lo, cur.hi);
      await this.flushIfFull();
    });
  }

  /**
   * copyFromFile only fills clusters that nothing is allocated in. Ops come in guest order (as
   * convert makes them): one lookup over their whole span, swept against the ops, instead of one
   * per op. Any other order is looked up op by op.
   */
  private async refuseAllocated(ops: Float64Array): Promise<void> {
    const refuse = (at: number) => new InvalidArgument(`${this.path}: copyFromFile into allocated clusters at ${at}`, { ref: this.path });
    let sorted = true;
    for (let i = 3; i < ops.length && sorted; i += 3) sorted = ops[i + 1]! >= ops[i - 2]! + ops[i - 1]!;
    if (!sorted) {
      for (let i = 0; i < ops.length; i += 3) {
        for (const r of await this.runs(ops[i + 1]!, ops[i + 2]!)) if (r.entry.kind !== 'unallocated') throw refuse(r.start);
      }
      return;
    }
    const first = ops[1]!;
    const runs = await this.runs(first, ops[ops.length - 2]! + ops[ops.length - 1]! - first);
    let i = 0;
    for (const r of runs) {
      if (r.entry.kind === 'unallocated') continue;
      // The first op that ends after the run starts: it overlaps the run if it starts before its end.
      while (i < ops.length && ops[i + 1]! + ops[i + 2]! <= r.start) i += 3;
      if (i < ops.length && ops[i + 1]! < r.start + r.length) throw refuse(Math.max(r.start, ops[i + 1]!));
    }
  }

  /** Write with allocation; caller holds the exclusive lock. */
  async writeLocked(offset: number, data: Uint8Array): Promise<void> {
    const end = offset + data.length;
    const cs = this.cs;
    let p = offset;
    while (p < end) {
      const l1i = Math.floor(p / cs / this.l2Entries);
      const sliceEnd = Math.min(end, (l1i + 1) * this.l2Entries * cs);
      const { offset: l2off, table } = await this.l2ForWrite(l1i);
      while (p < sliceEnd) {
        const gc = Math.floor(p / cs);
        const idx = gc % this.l2Entries;
        const first = decodeL2(...readEntry(table, idx), this.h.clusterBits);
        if (first.kind === 'normal' && first.copied) {
          // In place: extend over host-contiguous owned clusters.
          let q = Math.min(sliceEnd, (gc + 1) * cs);
          let host = first.offset + (p - gc * cs);
          let expected = first.offset + cs;
          while (q < sliceEnd) {
            const e = decodeL2(...readEntry(table, Math.floor(q / cs) % this.l2Entries), this.h.clusterBits);
            if (!(e.kind === 'normal' && e.copied && e.offset === expected)) break;
            expected += cs;
            q = Math.min(sliceEnd, q + cs);
          }
          await this.file.write(host, data.subarray(p - offset, q - offset));
          this.fileLen = Math.max(this.fileLen, host + (q - p));
          p = q;
          continue;
        }
        // Allocate: extend over clusters that all need new space.
        const olds: L2Entry[] = [first];
        let q = Math.min(sliceEnd, (gc + 1) * cs);
        while (q < sliceEnd) {
          const e = decodeL2(...readEntry(table, Math.floor(q / cs) % this.l2Entries), this.h.clusterBits);
          if (e.kind === 'normal' && e.copied) break;
          olds.push(e);
          q = Math.min(sliceEnd, q + cs);
        }
        await this.allocAndWrite(gc, olds, p, q, data.subarray(p - offset, q - offset), l2off, table);
        p = q;
      }
    }
  }

  /**
   * Give clusters gc… new space, write [p, q) of guest data into it with the rest of the first
   * and last clusters copied from their old content, point the L2 entries at it, then drop
   * the old clusters. Order: refcounts → data → L2 → decrements.
   */
  private async allocAndWrite(gc: number, olds: L2Entry[], p: number, q: number, data: Uint8Array,
    l2off: number, table: Uint8Array): Promise<void> {
    const cs = this.cs;
    const n = olds.length;
    const host = await this.refcounts.alloc(n);
    const buf = await this.withOldEdges(gc, olds, p, q, data);
    await this.file.write(host, buf);
    this.fileLen = Math.max(this.fileLen, host + n * cs);
    const idx0 = gc % this.l2Entries;
    for (let i = 0; i < n; i++) writeEntry(table, idx0 + i, ...encodeL2Normal(host + i * cs, true));
    await this.writeL2(l2off, table, idx0, idx0 + n);
    for (const e of olds) await this.release(e);
  }

  /**
   * Whole clusters gc… (old entries `olds`) holding guest bytes [p, q) = `data`: the head of the
   * first and the tail of the last cluster come from their old content (copy-on-write).
   */
  private async withOldEdges(gc: number, olds: L2Entry[], p: number, q: number, data: Uint8Array): Promise<Uint8Array> {
    const cs = this.cs;
    const n = olds.length;
    const base = gc * cs;
    if (p === base && q === base + n * cs) return data;
    const buf = new Uint8Array(n * cs);
    if (p > base) buf.set((await this.oldCluster(gc, olds[0]!)).subarray(0, p - base), 0);
    const lastStart = base + (n - 1) * cs;
    if (q < lastStart + cs) {
      const last = await this.oldCluster(gc + n - 1, olds[n - 1]!);
      buf.set(last.subarray(q - lastStart), q - base);
    }
    buf.set(data, p - base);
    return buf;
  }

  /** Drop the reference an L2 entry held (after the entry no longer points there). */
  async release(e: L2Entry): Promise<void> {
    if ((e.kind === 'normal' || e.kind === 'zero') && e.offset !== 0) {
      await this.refcounts.free(e.offset, 1);
    } else if (e.kind === 'compressed') {
      const [c0, n] = this.compressedClusters(e);
      await this.refcounts.update(c0, n, -1);
    }
  }

  /** Host clusters a compressed entry touches, as QEMU counts them. */
  compressedClusters(e: L2Entry): [number, number] {
    const start = e.compressedOffset! - (e.compressedOffset! % 512);
    const bytes = e.compressedBytes! + (e.compressedOffset! % 512);
    const c0 = Math.floor(start / this.cs);
    const c1 = Math.floor((start + bytes - 1) / this.cs);
    return [c0, c1 - c0 + 1];
  }

  /** An L2 table for index l1i that this image owns alone (allocated or copied as needed). */
  async l2ForWrite(l1i: number): Promise<{ offset: number; table: Uint8Array }> {
    if (l1i >= this.l1Size) throw new Corrupt(`${this.path}: L1 table too small for the virtual size`, { ref: this.path });
    const e = decodeL1(...readEntry(this.l1, l1i));
    if (e.l2Offset === 0) {
      const off = await this.refcounts.alloc(1);
      const t = new Uint8Array(this.cs);
      await this.writeL2(off, t, 0, this.l2Entries);
      this.fileLen = Math.max(this.fileLen, off + this.cs);
      this.l2cache.set(off, t);
      await this.setL1(l1i, off, true);
      return { offset: off, table: t };
    }
    const t = await this.l2Table(e.l2Offset);
    if (e.copied) return { offset: e.l2Offset, table: t };
    if ((await this.refcounts.get(e.l2Offset / this.cs)) === 1) {
      await this.setL1(l1i, e.l2Offset, true);
      return { offset: e.l2Offset, table: t };
    }
    const off = await this.refcounts.alloc(1);
    const copy = t.slice();
    await this.writeL2(off, copy, 0, this.l2Entries);
    this.fileLen = Math.max(this.fileLen, off + this.cs);
    this.l2cache.set(off, copy);
    await this.setL1(l1i, off, true);
    await this.refcounts.free(e.l2Offset, 1);
    return { offset: off, table: copy };
  }

  async setL1(l1i: number, l2Offset: number, copied: boolean): Promise<void> {
    const b = new Uint8Array(8);
    writeEntry(b, 0, ...encodeL1(l2Offset, copied));
    if (this.deferring) this.dirtyL1.add(l1i);
    else await this.file.write(this.h.l1TableOffset + l1i * 8, b);
    this.l1.set(b, l1i * 8);
  }

  // ---- zeroes and discard -------------------------------------------------------------------

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.assertWritable();
    this.checkRange(offset, length);
    await this.lock.exclusive(async () => {
      await this.zeroLocked(offset, length, 'zero');
      await this.flushIfFull();
    });
  }

  async discard(offset: number, length: number): Promise<void> {
    this.assertWritable();
    this.checkRange(offset, length);
    await this.lock.exclusive(async () => {
      await this.zeroLocked(offset, length, 'discard');
      await this.flushIfFull();
    });
  }

  /**
   * Zero-write or discard. Whole clusters change their L2 entry (zero flag on v3; unallocated
   * where that reads as zeros); partial clusters of a zero-write get zero bytes; partial
   * clusters of a discard are left alone (discard is advisory, as in QEMU).
   */
  private async zeroLocked(offset: number, length: number, mode: 'zero' | 'discard'): Promise<void> {
    const cs = this.cs;
    const end = offset + length;
    // Whole clusters change their entry; the last cluster counts as whole when the range
    // reaches the end of the image.
    const wholeStart = Math.min(end, Math.ceil(offset / cs) * cs);
    const wholeEnd = end === this.h.size ? end : Math.max(wholeStart, Math.floor(end / cs) * cs);
    if (mode === 'zero') {
      if (offset < wholeStart) await this.writeLocked(offset, new Uint8Array(wholeStart - offset));
      if (wholeEnd < end) await this.writeLocked(wholeEnd, new Uint8Array(end - wholeEnd));
    }
    let p = wholeStart;
    while (p < wholeEnd) {
      const l1i = Math.floor(p / cs / this.l2Entries);
      const sliceEnd = Math.min(wholeEnd, (l1i + 1) * this.l2Entries * cs);
      const hasL2 = l1i < this.l1Size && decodeL1(...readEntry(this.l1, l1i)).l2Offset !== 0;
      if (!hasL2 && !this.backing) { p = sliceEnd; continue; }
      if (!hasL2 && this.h.version === 2) {
        if (mode === 'zero') await this.zeroFill(p, sliceEnd);
        p = sliceEnd;
        continue;
      }
      if (this.h.version === 2 && mode === 'zero' && this.backing) {
        await this.zeroFill(p, sliceEnd);
        p = sliceEnd;
        continue;
      }
      const { offset: l2off, table } = await this.l2ForWrite(l1i);
      const idx0 = Math.floor(p / cs) % this.l2Entries;
      const n = Math.ceil((sliceEnd - p) / cs);
      const olds: L2Entry[] = [];
      for (let i = 0; i < n; i++) {
        const e = decodeL2(...readEntry(table, idx0 + i), this.h.clusterBits);
        const useZeroFlag = this.h.version === 3 && (this.backing !== undefined || e.kind !== 'unallocated');
        if (useZeroFlag) {
          if (e.kind === 'zero' && e.offset === 0) continue;
          writeEntry(table, idx0 + i, ...encodeL2Zero());
        } else {
          if (e.kind === 'unallocated') continue;
          writeEntry(table, idx0 + i, 0, 0);
        }
        olds.push(e);
      }
      if (olds.length > 0) {
        await this.writeL2(l2off, table, idx0, idx0 + n);
        for (const e of olds) await this.release(e);
      }
      p = sliceEnd;
    }
  }

  private async zeroFill(p: number, end: number): Promise<void> {
    for (let q = p; q < end; q += CHUNK) await this.writeLocked(q, new Uint8Array(Math.min(CHUNK, end - q)));
  }

  // ---- block status -------------------------------------------------------------------------

  async map(): Promise<BlockStatus[]> {
    return this.blockStatus(0, this.h.size);
  }

  async blockStatus(offset = 0, length?: number): Promise<BlockStatus[]> {
    const len = length ?? this.h.size - offset;
    this.checkRange(offset, len);
    return this.lock.shared(() => this.statusLocked(offset, len, 0));
  }

  async statusLocked(offset: number, length: number, depth: number): Promise<BlockStatus[]> {
    const out: BlockStatus[] = [];
    // Objects built whole (not spread from a base): this runs once per run of a large map.
    const status = (run: Run, present: boolean, zero: boolean, compressed: boolean, offset?: number): BlockStatus => {
      const s: BlockStatus = { start: run.start, length: run.length, depth, present, zero, data: present && !zero, compressed, filename: this.path };
      if (offset !== undefined) s.offset = offset;
      return s;
    };
    for (const run of await this.runs(offset, length)) {
      switch (run.entry.kind) {
        case 'normal':
          out.push(status(run, true, false, false, this.hostOf(run, run.start)));
          break;
        case 'compressed':
          out.push(status(run, true, false, true));
          break;
        case 'zero':
          out.push(status(run, true, true, false, run.entry.offset !== 0 ? this.hostOf(run, run.start) : undefined));
          break;
        case 'unallocated': {
          const b = this.backing as (Image & { statusLocked?: unknown }) | undefined;
          const inBacking = b ? Math.max(0, Math.min(run.length, b.virtualSize - run.start)) : 0;
          if (b && inBacking > 0) {
            for (const s of await b.blockStatus(run.start, inBacking)) out.push({ ...s, depth: s.depth + depth + 1 });
          }
          if (inBacking < run.length) {
            out.push({ start: run.start + inBacking, length: run.length - inBacking, depth, present: false, zero: true, data: false, compressed: false });
          }
          break;
        }
      }
    }
    return mergeStatus(out);
  }

  // ---- header, resize, flush, close ---------------------------------------------------------

  /** Rewrite the whole first cluster (QEMU's way). */
  async writeHeader(): Promise<void> {
    const buf = encodeHeader(this.h);
    await this.file.write(0, buf);
  }

  async resize(newSize: number): Promise<void> {
    this.assertWritable();
    if (!Number.isSafeInteger(newSize) || newSize < 0) throw new InvalidArgument(`${this.path}: bad size ${newSize}`, { ref: this.path });
    await this.lock.exclusive(() => this.writeThrough(async () => {
      if (newSize < this.h.size) {
        const from = Math.ceil(newSize / this.cs) * this.cs;
        if (from < this.h.size) {
          for (const r of await this.runs(from, this.h.size - from)) {
            if (r.entry.kind === 'normal' || r.entry.kind === 'compressed') {
              throw new OutOfRange(`${this.path}: cannot shrink to ${newSize}: data is allocated at ${r.start}`, {
                ref: this.path, hint: 'discard the tail first, or grow instead',
              });
            }
          }
        }
      }
      const need = Math.ceil(newSize / (this.cs * this.l2Entries));
      if (need > this.l1Size) await this.growL1Locked(need);
      const oldSize = this.h.size;
      const b = new Uint8Array(8);
      setU64(view(b), 0, newSize);
      await this.file.write(24, b);
      this.h.size = newSize;
      // As QEMU does: a grown area reads as zeros even where a bigger backing file has data.
      const shadowEnd = Math.min(newSize, this.backing?.virtualSize ?? 0);
      if (shadowEnd > oldSize) await this.zeroLocked(oldSize, shadowEnd - oldSize, 'zero');
    }));
  }

  /** A bigger active L1: written fresh, header switched to it, then the old one freed. */
  async growL1Locked(entries: number): Promise<void> {
    if (entries * 8 > MAX_L1_BYTES) throw new OutOfRange(`${this.path}: the L1 table would exceed ${MAX_L1_BYTES} bytes`, { ref: this.path });
    const cs = this.cs;
    const clusters = Math.ceil((entries * 8) / cs);
    const off = await this.refcounts.alloc(clusters);
    const nl1 = new Uint8Array(entries * 8);
    nl1.set(this.l1);
    await this.file.write(off, nl1);
    this.fileLen = Math.max(this.fileLen, off + nl1.length);
    await this.file.sync();
    const hb = new Uint8Array(12);
    view(hb).setUint32(0, entries);
    setU64(view(hb), 4, off);
    await this.file.write(36, hb);
    const oldOff = this.h.l1TableOffset;
    const oldClusters = Math.ceil(this.l1.length / cs);
    this.h.l1TableOffset = off;
    this.h.l1Size = entries;
    this.l1 = nl1;
    if (oldOff !== 0 && oldClusters > 0) await this.refcounts.free(oldOff, oldClusters);
  }

  async flush(): Promise<void> {
    this.checkOpen();
    if (!this.readOnly) {
      await this.lock.exclusive(async () => {
        await this.flushMetadataLocked();
        await this.file.sync();
      });
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.lock.exclusive(async () => {
      this.closed = true;
      if (!this.readOnly) {
        await this.flushMetadataLocked();
        await this.file.sync();
      }
      await this.file.close();
      this.l2cache.clear();
    });
    if (this.backing) await this.backing.close();
  }

  async fileSize(): Promise<number> {
    this.checkOpen();
    return this.file.size();
  }

  async check(opts: CheckOptions = {}): Promise<CheckResult> {
    this.checkOpen();
    if (opts.repair) this.assertWritable();
    return this.lock.exclusive(() => this.writeThrough(() => checkImage(this, opts)));
  }
}
