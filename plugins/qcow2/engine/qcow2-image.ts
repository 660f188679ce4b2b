import { dirname, isAbsolute, join } from 'node:path';
import { InvalidArgument } from '../../../core/index.js';
import { uninitialized } from '../format/bytes.js';
import { AUTOCLEAR_BITMAPS, EXT_BITMAPS, INCOMPAT_DIRTY } from '../format/constants.js';
import { decodeHeader, encodeHeader, setBackingFormat, type Header } from '../format/header.js';
import { Bitmaps } from './bitmaps.js';
import { checkImage } from './check.js';
import { ownAllocations } from './cluster-map.js';
import { readLocked, statusLocked } from './cluster-read.js';
import { fillUnallocated, makeEmptyLocked, write, writeDurable, zeroLocked, zeroUnallocatedLocked } from './cluster-write.js';
import { writeCompressed } from './compressed-write.js';
import { copyFromFile } from './copy-in.js';
import { ImageFile } from './file.js';
import { headerInfo } from './header-info.js';
import type { ImageNode } from './image-node.js';
import { Qcow2State, type Qcow2Parts } from './qcow2-state.js';
import { resizeLocked } from './resize.js';
import { SnapshotManager } from './snapshots.js';
import type {
  Allocation, BitmapOps, BlockStatus, ChainEntry, CheckOptions, CheckResult, CloseOptions, HeaderInfo, Image, NewBacking, SnapshotOps, FlushOptions, ReadOptions, WriteOptions,
} from './types.js';

/** One open qcow2 layer: the public operations, each taking the lock it needs over the shared Qcow2State. */
export class Qcow2Image implements ImageNode {
  readonly format = 'qcow2' as const;
  readonly snapshots: SnapshotOps;
  private readonly s: Qcow2State;
  private readonly bm: Bitmaps;

  constructor(p: Qcow2Parts) {
    let bm: Bitmaps | undefined;
    this.s = new Qcow2State(p, (s) => (bm = new Bitmaps(s)));
    this.bm = bm!;
    this.snapshots = new SnapshotManager(this.s);
  }

  get bitmaps(): BitmapOps { return this.bm; }

  get path(): string { return this.s.path; }
  get file(): ImageFile { return this.s.file; }
  get readOnly(): boolean { return this.s.readOnly; }
  get backing(): Image | undefined { return this.s.backing; }
  get clusterSize(): number { return this.s.cs; }
  get virtualSize(): number { return this.s.h.size; }
  get header(): HeaderInfo { return headerInfo(this.s.h); }
  get chain(): ChainEntry[] { return [{ ...this.s.entry }, ...(this.s.backing?.chain ?? [])]; }

  /**
   * After the open: read the bitmap directory; read-write, also what prepareForWriting does.
   */
  async init(): Promise<void> {
    await this.bm.load();
    if (!this.s.readOnly) await this.prepareForWriting();
  }

  /**
   * Read-write open: a dirty (lazy refcounts) image gets its refcounts rebuilt; autoclear bits we
   * do not keep up to date are cleared, and so is a bitmaps extension that a program without
   * bitmap support left stale (its autoclear bit clear: QEMU drops it too; its clusters leak);
   * then the bitmaps are flagged in use (bitmaps.ts).
   */
  private async prepareForWriting(): Promise<void> {
    const h = this.s.h;
    let rewrite = false;
    if (h.incompatibleFeatures & INCOMPAT_DIRTY) {
      await this.check({ repair: 'all' });
      h.incompatibleFeatures &= ~INCOMPAT_DIRTY;
      rewrite = true;
    }
    const stale = h.extensions.some((e) => e.type === EXT_BITMAPS) && !(h.autoclearFeatures & AUTOCLEAR_BITMAPS);
    if (stale) {
      h.extensions = h.extensions.filter((e) => e.type !== EXT_BITMAPS);
      rewrite = true;
    }
    const keep = this.bm.any || h.extensions.some((e) => e.type === EXT_BITMAPS) ? AUTOCLEAR_BITMAPS : 0n;
    if (h.version === 3 && (h.autoclearFeatures & ~keep) !== 0n) {
      h.autoclearFeatures &= keep;
      rewrite = true;
    }
    if (rewrite) {
      await this.s.writeHeader();
      await this.s.file.sync();
    }
    await this.bm.claim();
  }

  // ---- I/O ----

  async read(offset: number, length: number, opts?: ReadOptions): Promise<Uint8Array> {
    const out = uninitialized(length);
    await this.readInto(out, offset, opts);
    return out;
  }

  async readInto(buf: Uint8Array, offset: number, opts?: ReadOptions): Promise<void> {
    this.s.checkRange(offset, buf.length);
    await this.s.lock.shared(() => readLocked(this.s, buf, offset, opts?.background));
  }

  async write(offset: number, data: Uint8Array, opts: WriteOptions = {}): Promise<void> {
    this.s.assertWritable();
    this.s.checkRange(offset, data.length);
    // Marked before the data (a reader of the bitmap never misses a write that has landed) and
    // again after it: a clear or a new bitmap that came in between must see it too.
    this.bm.mark(offset, data.length);
    // FUA: in one round trip where it can (writeDurable); deferred metadata needs its flush.
    if (opts.fua && data.length > 0 && !this.s.meta.deferred) await writeDurable(this.s, offset, data);
    else {
      if (data.length > 0) await write(this.s, offset, data, opts.background);
      if (opts.fua) await this.flush();
    }
    this.bm.mark(offset, data.length);
  }

  async writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    this.s.assertWritable();
    this.s.checkRange(offset, data.length);
    this.bm.mark(offset, data.length);
    if (data.length > 0) await writeCompressed(this.s, offset, data);
    this.bm.mark(offset, data.length);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    await this.zeroOrDiscard(offset, length, 'zero');
  }

  async discard(offset: number, length: number): Promise<void> {
    await this.zeroOrDiscard(offset, length, 'discard');
  }

  private async zeroOrDiscard(offset: number, length: number, mode: 'zero' | 'discard'): Promise<void> {
    this.s.assertWritable();
    this.s.checkRange(offset, length);
    this.bm.mark(offset, length);
    await this.s.lock.exclusive(async () => {
      await zeroLocked(this.s, offset, length, mode);
      await this.s.meta.flushIfFull();
    });
    this.bm.mark(offset, length);
  }

  async map(): Promise<BlockStatus[]> {
    return this.blockStatus(0, this.s.h.size);
  }

  async blockStatus(offset = 0, length?: number): Promise<BlockStatus[]> {
    const len = length ?? this.s.h.size - offset;
    this.s.checkRange(offset, len);
    return this.s.lock.shared(() => statusLocked(this.s, offset, len));
  }

  async resize(newSize: number): Promise<void> {
    this.s.assertWritable();
    await this.s.lock.exclusive(() => this.s.meta.writeThrough(async () => {
      this.bm.assertResizable();
      await resizeLocked(this.s, newSize);
      this.bm.resize(newSize);
    }));
  }

  async flushMetadata(): Promise<void> {
    this.s.checkOpen();
    // Nothing dirty: return without waiting for the exclusive lock (a job calls this per chunk,
    // and waiting would stall its read-ahead).
    if (!this.s.meta.hasDirty) return;
    await this.s.lock.exclusive(() => this.s.meta.flushLocked());
  }

  async setDeferMetadata(on: boolean): Promise<void> {
    this.s.checkOpen();
    if (this.s.readOnly || this.s.meta.deferred === on) return;
    await this.s.lock.exclusive(() => this.s.meta.setDeferring(on));
  }

  async flush(opts?: FlushOptions): Promise<void> {
    this.s.checkOpen();
    if (this.s.readOnly) return;
    await this.s.lock.exclusive(() => this.s.meta.flushLocked());
    // The fdatasync under the shared lock only: every write acknowledged before this flush has
    // its data and (just now) its metadata in the file, so the sync covers it, while guest
    // writes go on meanwhile instead of waiting out the sync (a live copy's write-blocking writes
    // waited ~300 ms on a target's flush); close and structural changes still wait for it.
    await this.s.lock.shared(() => this.s.file.sync(opts?.background));
  }

  async close(opts?: CloseOptions): Promise<void> {
    const s = this.s;
    if (s.closed) return;
    await s.lock.exclusive(async () => {
      s.closed = true;
      // A failed state (see Qcow2State.reloadTables) is not flushed: its tables are not the file's.
      if (!s.readOnly && s.failed === undefined && opts?.writeNothing !== true) {
        await s.meta.flushLocked();
        await s.file.sync();
        await this.bm.closeLocked();
      }
      await s.file.close();
      s.meta.clear();
    });
    if (s.backing) await s.backing.close();
  }

  async fileSize(): Promise<number> {
    this.s.checkOpen();
    return this.s.file.size();
  }

  async check(opts: CheckOptions = {}): Promise<CheckResult> {
    this.s.checkOpen();
    if (opts.repair) this.s.assertWritable();
    return this.s.lock.exclusive(() => this.s.meta.writeThrough(() => checkImage(this.s, opts)));
  }

  // ---- block-job surface ----

  async ownAllocations(offset: number, length: number): Promise<Allocation[]> {
    this.s.checkRange(offset, length);
    return this.s.lock.shared(() => ownAllocations(this.s, offset, offset + length));
  }

  async fillUnallocated(offset: number, data: Uint8Array): Promise<number> {
    this.s.assertWritable();
    this.s.checkRange(offset, data.length);
    if (data.length === 0) return 0;
    return fillUnallocated(this.s, offset, data);
  }

  async zeroUnallocated(offset: number, length: number): Promise<void> {
    this.s.assertWritable();
    this.s.checkRange(offset, length);
    await this.s.lock.exclusive(async () => {
      await zeroUnallocatedLocked(this.s, offset, offset + length);
      await this.s.meta.flushIfFull();
    });
  }

  async makeEmpty(): Promise<void> {
    this.s.assertWritable();
    await this.s.lock.exclusive(() => makeEmptyLocked(this.s));
    await this.flush();
  }

  async setBacking(next: NewBacking): Promise<void> {
    const s = this.s;
    s.checkOpen();
    if (next.name !== undefined && (typeof next.name !== 'string' || next.name === '')) {
      throw new InvalidArgument(`${s.path}: a backing file name must be a non-empty string (undefined: no backing file)`, { ref: s.path });
    }
    await s.lock.exclusive(async () => {
      // The data the job copied is referenced and durable before the header drops the old backing.
      if (!s.readOnly) {
        await s.meta.flushLocked();
        await s.file.sync();
      }
      setBackingOf(s.h, next);
      if (s.readOnly) {
        await rewriteBackingOnDisk(s.path, s.cs, next);
      } else {
        await s.writeHeader();
        await s.file.sync();
      }
      const old = s.backing;
      s.backing = next.image;
      const e = s.entry;
      delete e.backingFilename;
      delete e.fullBackingFilename;
      delete e.backingFormat;
      if (next.name !== undefined) {
        e.backingFilename = next.name;
        e.fullBackingFilename = isAbsolute(next.name) ? next.name : join(dirname(s.path), next.name);
        if (next.format !== undefined) e.backingFormat = next.format;
      }
      if (old && old !== next.image) await old.close();
    });
  }

  /** For `convert` into this image: see copy-in.ts. */
  copyFromFile(src: ImageFile, ops: Float64Array, until?: Float64Array): Promise<void> {
    if (this.bm.any) for (let i = 0; i < ops.length; i += 3) this.bm.mark(ops[i + 1]!, ops[i + 2]!);
    return copyFromFile(this.s, src, ops, until);
  }
}

function setBackingOf(h: Header, next: NewBacking): void {
  h.backingFile = next.name;
  setBackingFormat(h, next.name === undefined ? undefined : next.format);
}

/**
 * The header of a layer that this process holds read-only (a layer inside a chain): re-read from
 * the file through a private read-write handle, its backing fields changed, written back in one
 * write and flushed. Everything the new reference depends on is the caller's to flush first.
 */
async function rewriteBackingOnDisk(path: string, clusterSize: number, next: NewBacking): Promise<void> {
  const f = await ImageFile.open(path, false);
  try {
    const h = decodeHeader(await f.read(0, clusterSize), path);
    setBackingOf(h, next);
    await f.write(0, encodeHeader(h));
    await f.sync();
  } finally {
    await f.close();
  }
}

