import { Corrupt } from '../../../core/index.js';
import { encodeL1, writeEntry } from '../format/entries.js';
import type { ImageFile } from './file.js';
import type { Refcounts } from './refcounts.js';
import { TableCache } from './table-cache.js';

/** Where the active L1 table lives: the image state (read each time: growing the L1 moves it). */
export interface L1Holder {
  readonly l1: Uint8Array;
  readonly h: { readonly l1TableOffset: number };
}

/**
 * The L2 tables of one image: an LRU cache of what is on disk, and, in deferred mode
 * (OpenOptions.deferMetadata), the L2 tables and L1 entries changed since the last flush, kept
 * pinned here until flushLocked() writes them in crash-safe order — as QEMU's qcow2 metadata
 * cache does. Written through at once otherwise. Callers hold the image's exclusive lock for
 * every change (or its metaLock, see cluster-write.ts).
 */
export class MetadataCache {
  private readonly cache: TableCache;
  private deferring: boolean;
  private readonly dirtyL2 = new Map<number, Uint8Array>();
  private readonly dirtyL1 = new Set<number>();
  /** Dirty metadata beyond which a write flushes it (bounds memory). */
  private readonly dirtyLimit: number;

  constructor(private readonly file: ImageFile, private readonly refcounts: Refcounts, private readonly owner: L1Holder,
    private readonly cs: number, cacheBytes: number, deferring: boolean) {
    this.cache = new TableCache(cacheBytes / 2);
    this.deferring = deferring;
    this.refcounts.deferring = deferring;
    this.dirtyLimit = Math.max(cacheBytes / 2, 4 * cs);
  }

  /** The L2 table at a host offset: the pinned dirty copy, the cached one, or read from disk. */
  async l2Table(l2Offset: number, what = 'L2 table'): Promise<Uint8Array> {
    let t = this.dirtyL2.get(l2Offset) ?? this.cache.get(l2Offset);
    if (!t) {
      if (l2Offset % this.cs !== 0) {
        throw new Corrupt(`${this.file.path}: ${what} at unaligned offset 0x${l2Offset.toString(16)}`, {
          ref: this.file.path, hint: 'the image is damaged; check it with `qemu-img check`',
        });
      }
      t = await this.file.readExact(l2Offset, this.cs, what);
      this.cache.set(l2Offset, t);
    }
    return t;
  }

  /** Whether the table at `l2Offset` is in memory (reading it costs no I/O). */
  has(l2Offset: number): boolean {
    return this.cache.has(l2Offset) || this.dirtyL2.has(l2Offset);
  }

  /** Keep a table that the caller has just written (or will write through writeL2). */
  remember(l2Offset: number, table: Uint8Array): void {
    this.cache.set(l2Offset, table);
  }

  /** A cluster that held an L2 table was freed, or was rewritten behind the cache: forget it. */
  forget(l2Offset: number): void {
    this.cache.delete(l2Offset);
    this.dirtyL2.delete(l2Offset);
  }

  /** Drop every cached table (the mapping was replaced wholesale: snapshots). */
  clear(): void {
    this.cache.clear();
  }

  /** Write entries [from, to) of an L2 table (now, or at the next flushLocked()). */
  async writeL2(l2Offset: number, table: Uint8Array, from: number, to: number): Promise<void> {
    if (this.deferring) {
      this.dirtyL2.set(l2Offset, table);
      return;
    }
    await this.file.write(l2Offset + from * 8, table.subarray(from * 8, to * 8));
  }

  /** Point L1 entry l1i at an L2 table (in memory at once; on disk now or at the next flush). */
  async setL1(l1i: number, l2Offset: number, copied: boolean): Promise<void> {
    const b = new Uint8Array(8);
    writeEntry(b, 0, ...encodeL1(l2Offset, copied));
    if (this.deferring) this.dirtyL1.add(l1i);
    else await this.file.write(this.owner.h.l1TableOffset + l1i * 8, b);
    this.owner.l1.set(b, l1i * 8);
  }

  /** Deferred mode (and not inside writeThrough). */
  get deferred(): boolean {
    return this.deferring;
  }

  get hasDirty(): boolean {
    return this.deferring && (this.dirtyL2.size > 0 || this.dirtyL1.size > 0 || this.refcounts.hasPending);
  }

  /** More deferred metadata than the cache should pin. */
  get overLimit(): boolean {
    return this.deferring && this.dirtyL2.size * this.cs + this.refcounts.dirtyBytes > this.dirtyLimit;
  }

  /**
   * Write the deferred metadata in crash-safe order: refcount increments, then the L2 tables
   * and L1 entries that reference the new clusters, then the decrements of what they no longer
   * reference. No fdatasync (flush() adds it). Caller holds the exclusive lock.
   */
  async flushLocked(): Promise<void> {
    if (!this.hasDirty) return;
    await this.refcounts.writeDirty();
    for (const [off, t] of await this.file.writeTables(this.dirtyL2)) this.cache.set(off, t);
    const l1 = [...this.dirtyL1];
    this.dirtyL1.clear();
    await this.file.writeEntries(this.owner.h.l1TableOffset, this.owner.l1, l1);
    await this.refcounts.applyDeferredFrees();
    await this.refcounts.writeDirty();
  }

  /** flushLocked() when more is pinned than the cache allows. Caller holds the exclusive lock. */
  async flushIfFull(): Promise<void> {
    if (this.overLimit) await this.flushLocked();
  }

  /** Defer from now on, or write through (what is held first). Caller holds the exclusive lock. */
  async setDeferring(on: boolean): Promise<void> {
    if (!on) await this.flushLocked();
    this.deferring = this.refcounts.deferring = on;
  }

  /**
   * Run a structural change (snapshots, check, resize, header rewrites) with every metadata write
   * going straight to the file, as its own ordering assumes. Caller holds the exclusive lock.
   */
  async writeThrough<T>(fn: () => Promise<T>): Promise<T> {
    if (!this.deferring) return fn();
    await this.flushLocked();
    this.deferring = this.refcounts.deferring = false;
    try {
      return await fn();
    } finally {
      this.deferring = this.refcounts.deferring = true;
    }
  }
}
