import { Corrupt, OutOfRange } from '../../../core/index.js';
import { setU64, view } from '../format/bytes.js';
import { MAX_REFTABLE_BYTES } from '../format/constants.js';
import { entriesPerBlock, fillRefcounts, getRefcount, maxRefcount, refcountsAllZero, reftableEntry, setRefcount } from '../format/refcount-block.js';
import type { ImageFile } from './file.js';
import type { TableCache } from './table-cache.js';

/**
 * The refcount structure of an open image: lookups, allocation (lowest free run first, like
 * QEMU) and updates. Written through to disk at once by default, so that the caller can order
 * them against the references (increments before the reference, decrements after).
 *
 * Deferred mode (`deferring`): increments change the cached blocks, which stay pinned as dirty
 * until writeDirty(); decrements are only queued, and applied by applyDeferredFrees() once the
 * caller has written the references that no longer point at those clusters. A queued cluster
 * keeps its refcount meanwhile, so it cannot be handed out again before the old reference is
 * gone from the disk. Whatever moment the process dies, the file has at most leaks.
 * Callers hold the image's exclusive lock for every mutation.
 */
export class Refcounts {
  readonly epb: number;
  private freeHint = 0;
  /** One past the highest cluster known to be in use or in the file. */
  highWater: number;
  private readonly reserved: [number, number][] = [];
  /** Called with the host offset of every cluster whose refcount drops to zero. */
  onZero: ((offset: number) => void) | undefined;
  /** Deferred mode (see the class comment). */
  deferring = false;
  /** Deferred mode: changed refcount blocks by host offset, and changed table entries. */
  private readonly dirty = new Map<number, Uint8Array>();
  private readonly dirtyEntries = new Set<number>();
  /** Deferred mode: decrements waiting for applyDeferredFrees(), as [cluster, count]. */
  private pendingFrees: [number, number][] = [];

  constructor(
    private readonly file: ImageFile,
    private readonly clusterBits: number,
    readonly order: number,
    public table: Uint8Array,
    public tableOffset: number,
    private readonly cache: TableCache,
    /** Persist a moved refcount table in the header (offset, clusters). */
    private readonly onTableMoved: (offset: number, clusters: number) => Promise<void>,
    fileSize: number,
  ) {
    this.epb = entriesPerBlock(1 << clusterBits, order);
    this.highWater = Math.ceil(fileSize / (1 << clusterBits));
  }

  /** Called when reset() switches to a rebuilt table: every cluster's refcount may have changed. */
  onReset: (() => void) | undefined;

  /** Switch to a rebuilt refcount table (check -r all). */
  reset(table: Uint8Array, tableOffset: number, highWater: number): void {
    this.onReset?.();
    this.dirty.clear();
    this.dirtyEntries.clear();
    this.pendingFrees = [];
    this.table = table;
    this.tableOffset = tableOffset;
    this.cache.clear();
    this.freeHint = 0;
    this.highWater = Math.max(this.highWater, highWater);
  }

  private get cs(): number { return 1 << this.clusterBits; }
  get tableEntries(): number { return this.table.length / 8; }
  get max(): number { return maxRefcount(this.order); }

  private async block(bi: number): Promise<Uint8Array | undefined> {
    if (bi >= this.tableEntries) return undefined;
    const off = reftableEntry(this.table, bi);
    if (off === 0) return undefined;
    let b = this.dirty.get(off) ?? this.cache.get(off);
    if (!b) {
      if (off % this.cs !== 0) throw new Corrupt(`${this.file.path}: refcount block ${bi} at unaligned offset ${off}`, { ref: this.file.path });
      b = await this.file.readExact(off, this.cs, `refcount block ${bi}`);
      this.cache.set(off, b);
    }
    return b;
  }

  async get(cluster: number): Promise<number> {
    const b = await this.block(Math.floor(cluster / this.epb));
    return b ? getRefcount(b, cluster % this.epb, this.order) : 0;
  }

  private isReserved(c: number): boolean {
    return this.reserved.some(([s, e]) => c >= s && c < e);
  }

  /** Find n contiguous free clusters, lowest first from the hint. */
  private async findFree(n: number): Promise<number> {
    let start = this.freeHint;
    let run = 0;
    let c = this.freeHint;
    for (;;) {
      const bi = Math.floor(c / this.epb);
      const b = await this.block(bi);
      const end = (bi + 1) * this.epb;
      for (; c < end; c++) {
        const free = (b ? getRefcount(b, c % this.epb, this.order) === 0 : true) && !this.isReserved(c);
        if (free) {
          if (run === 0) start = c;
          if (++run === n) return start;
        } else {
          run = 0;
        }
      }
    }
  }

  /** Allocate n contiguous clusters with refcount 1 (written before returning); host offset. */
  async alloc(n: number): Promise<number> {
    const c = await this.findFree(n);
    this.reserved.push([c, c + n]);
    try {
      await this.update(c, n, 1);
    } finally {
      this.reserved.splice(this.reserved.findIndex(([s]) => s === c), 1);
    }
    this.freeHint = c + n;
    this.highWater = Math.max(this.highWater, c + n);
    return c * this.cs;
  }

  /**
   * Take the n clusters from `offset`, which lie at or past highWater (where nothing is in use)
   * and already hold data written there: refcount 1 each. Corrupt if one is in use after all.
   */
  async claim(offset: number, n: number): Promise<void> {
    const c = Math.floor(offset / this.cs);
    const { epb, order } = this;
    for (let i = c; i < c + n;) {
      const bi = Math.floor(i / epb);
      const stop = Math.min(c + n, (bi + 1) * epb);
      const b = await this.block(bi);
      if (b && !refcountsAllZero(b, i - bi * epb, stop - bi * epb, order)) {
        let used = i;
        while (getRefcount(b, used - bi * epb, order) === 0) used++;
        throw new Corrupt(`${this.file.path}: cluster ${used} past the end of the image is marked in use`, {
          ref: this.file.path, hint: 'the refcounts are damaged; repair with `check -r all`',
        });
      }
      i = stop;
    }
    this.reserved.push([c, c + n]);
    try {
      await this.apply(c, n, 1, true);
    } finally {
      this.reserved.splice(this.reserved.findIndex(([s]) => s === c), 1);
    }
    this.highWater = Math.max(this.highWater, c + n);
    // The next findFree need not walk the claimed clusters (8192 of them after a 512 MiB copy).
    if (this.freeHint >= c && this.freeHint < c + n) this.freeHint = c + n;
  }

  /** Drop one reference from n clusters starting at a host offset. */
  async free(offset: number, n: number): Promise<void> {
    const c = Math.floor(offset / this.cs);
    await this.update(c, n, -1);
  }

  /** Bytes of metadata waiting for writeDirty(). */
  get dirtyBytes(): number {
    return this.dirty.size * this.cs + this.dirtyEntries.size * 8;
  }

  get hasPending(): boolean {
    return this.dirty.size > 0 || this.dirtyEntries.size > 0 || this.pendingFrees.length > 0;
  }

  /** Write the dirty refcount blocks, then the table entries that point at new ones. */
  async writeDirty(): Promise<void> {
    for (const [off, b] of await this.file.writeTables(this.dirty)) this.cache.set(off, b);
    const entries = [...this.dirtyEntries];
    this.dirtyEntries.clear();
    await this.file.writeEntries(this.tableOffset, this.table, entries);
  }

  /** Apply the queued decrements (in memory; writeDirty() writes them). */
  async applyDeferredFrees(): Promise<void> {
    const frees = this.pendingFrees;
    this.pendingFrees = [];
    for (const [c, n] of frees) await this.apply(c, n, -1);
  }

  /**
   * Add `delta` to the refcount of clusters [c, c+n). Written through at once, or in deferred
   * mode kept dirty in memory (increments) or queued (decrements).
   */
  async update(c: number, n: number, delta: number): Promise<void> {
    if (this.deferring && delta < 0) {
      this.pendingFrees.push(...Array.from({ length: -delta }, (): [number, number] => [c, n]));
      return;
    }
    await this.apply(c, n, delta);
  }

  /**
   * Change the refcounts block by block, writing (or dirtying) each block once. `fresh`: the
   * entries are known to be zero (claim checked them) and become `delta`, in bulk.
   */
  private async apply(c: number, n: number, delta: number, fresh = false): Promise<void> {
    const { epb, order, max } = this; // locals: the inner loop runs once per cluster
    let i = c;
    while (i < c + n) {
      const bi = Math.floor(i / epb);
      const stop = Math.min(c + n, (bi + 1) * epb);
      let b = await this.block(bi);
      if (!b) {
        if (delta < 0) throw this.underflow(i);
        await this.ensureBlock(bi);
        b = (await this.block(bi))!;
      }
      const first = bi * epb;
      if (fresh) fillRefcounts(b, i - first, stop - first, order, delta);
      else for (let j = i; j < stop; j++) {
        const v = getRefcount(b, j - first, order) + delta;
        if (v < 0) throw this.underflow(j);
        if (v > max) throw new OutOfRange(`${this.file.path}: refcount of cluster ${j} would exceed ${max} (refcount_bits ${1 << order})`, { ref: this.file.path, hint: 'use an image with wider refcounts (refcount_bits=16)' });
        setRefcount(b, j - first, order, v);
        if (v === 0) {
          if (j < this.freeHint) this.freeHint = j;
          this.onZero?.(j * this.cs);
        }
      }
      if (this.deferring) {
        this.dirty.set(reftableEntry(this.table, bi), b);
      } else {
        const lo = ((i % this.epb) << this.order) >> 3;
        const hi = Math.max(lo + 1, (((stop - 1) % this.epb + 1) << this.order) + 7 >> 3);
        await this.file.write(reftableEntry(this.table, bi) + lo, b.subarray(lo, hi));
      }
      i = stop;
    }
  }

  private underflow(c: number): Corrupt {
    return new Corrupt(`${this.file.path}: refcount of cluster ${c} would drop below zero`, {
      ref: this.file.path, hint: 'the refcounts are damaged; repair with `check -r all`',
    });
  }

  /** Give block index bi a refcount block. */
  private async ensureBlock(bi: number): Promise<void> {
    if (bi >= this.tableEntries) await this.growTable(bi);
    if (reftableEntry(this.table, bi) !== 0) return;
    const k = await this.findFree(1);
    const block = new Uint8Array(this.cs);
    if (Math.floor(k / this.epb) === bi) {
      setRefcount(block, k % this.epb, this.order, 1);
    } else {
      this.reserved.push([k, k + 1]);
      try {
        await this.update(k, 1, 1);
      } finally {
        this.reserved.splice(this.reserved.findIndex(([s]) => s === k), 1);
      }
    }
    this.highWater = Math.max(this.highWater, k + 1);
    const entry = new Uint8Array(8);
    setU64(view(entry), 0, k * this.cs);
    if (this.deferring) {
      // writeDirty() writes the blocks before the table entries.
      this.dirty.set(k * this.cs, block);
      this.table.set(entry, bi * 8);
      this.dirtyEntries.add(bi);
      return;
    }
    await this.file.write(k * this.cs, block);
    this.cache.set(k * this.cs, block);
    // The block is on disk before the table points at it.
    await this.file.write(this.tableOffset + bi * 8, entry);
    this.table.set(entry, bi * 8);
  }

  /**
   * The table is full: write a bigger one, with new self-describing refcount blocks, in a fresh
   * area at the end of the file; switch the header to it; then free the old table.
   */
  private async growTable(needBi: number): Promise<void> {
    // The new table copies this one: every block it points at must be on disk first.
    await this.writeDirty();
    const cs = this.cs;
    let start = this.highWater;
    for (const [, e] of this.reserved) start = Math.max(start, e);
    const b0 = Math.floor(start / this.epb);
    let nb = 1;
    let t = Math.max(Math.ceil(this.table.length / cs) + 1, Math.ceil(((needBi + 1) * 8) / cs));
    for (;;) {
      const lastBi = Math.floor((start + nb + t - 1) / this.epb);
      const nb2 = lastBi - b0 + 1;
      const t2 = Math.max(t, Math.ceil(((Math.max(lastBi, needBi) + 1) * 8) / cs));
      if (nb2 === nb && t2 === t) break;
      nb = nb2;
      t = t2;
    }
    if (t * cs > MAX_REFTABLE_BYTES) {
      throw new OutOfRange(`${this.file.path}: the refcount table would exceed ${MAX_REFTABLE_BYTES} bytes`, { ref: this.file.path });
    }
    const area = new Uint8Array((nb + t) * cs);
    for (let c = start; c < start + nb + t; c++) {
      const bi = Math.floor(c / this.epb);
      setRefcount(area.subarray((bi - b0) * cs, (bi - b0 + 1) * cs), c % this.epb, this.order, 1);
    }
    const newTable = area.subarray(nb * cs);
    newTable.set(this.table);
    const dv = view(newTable);
    for (let j = 0; j < nb; j++) setU64(dv, (b0 + j) * 8, (start + j) * cs);
    await this.file.write(start * cs, area);
    // On disk before the header points at it (power loss, not just a killed process).
    await this.file.sync();
    const oldOffset = this.tableOffset;
    const oldClusters = Math.ceil(this.table.length / cs);
    await this.onTableMoved((start + nb) * cs, t);
    this.table = newTable.slice();
    this.tableOffset = (start + nb) * cs;
    for (let j = 0; j < nb; j++) this.cache.set((start + j) * cs, area.slice(j * cs, (j + 1) * cs));
    this.highWater = Math.max(this.highWater, start + nb + t);
    await this.free(oldOffset, oldClusters);
  }
}
