import { FailedPrecondition, InvalidArgument, nonZeroRuns, OutOfRange, RwLock, Unsupported } from '../../../core/index.js';
import type { ImageFile } from './file.js';
import type { ImageNode } from './image-node.js';
import { mergeStatus } from './status.js';
import type { Allocation, BlockStatus, ChainEntry, CheckResult, BitmapOps, FlushOptions, ReadOptions, SnapshotOps, WriteOptions } from './types.js';

const CHUNK = 1 << 20;
/** Hole granularity assumed for sparse raw files (the usual file-system block). */
const HOLE_BLOCK = 4096;

/** A raw image: the file is the disk. It has no backing file and allocates everything. */
export class RawImage implements ImageNode {
  readonly format = 'raw' as const;
  readonly clusterSize = 512;
  readonly header = undefined;
  readonly backing = undefined;
  private readonly lock = new RwLock();
  private closed = false;

  constructor(readonly path: string, readonly file: ImageFile, readonly readOnly: boolean, public virtualSize: number) {}

  get chain(): ChainEntry[] {
    return [{ filename: this.path, format: 'raw', virtualSize: this.virtualSize }];
  }

  private checkRange(offset: number, length: number): void {
    if (this.closed) throw new FailedPrecondition(`${this.path}: image is closed`, { ref: this.path });
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new InvalidArgument(`${this.path}: bad range offset=${offset} length=${length}`, { ref: this.path });
    }
    if (offset + length > this.virtualSize) {
      throw new OutOfRange(`${this.path}: range ${offset}+${length} is past the end of the image (${this.virtualSize} bytes)`, { ref: this.path });
    }
  }

  private writable(): void {
    if (this.readOnly) throw new FailedPrecondition(`${this.path}: image is open read-only`, { ref: this.path });
  }

  async read(offset: number, length: number, opts?: ReadOptions): Promise<Uint8Array> {
    this.checkRange(offset, length);
    return this.lock.shared(() => this.file.read(offset, length, opts?.background));
  }

  /** Raw images keep no metadata. */
  async flushMetadata(): Promise<void> {}

  async setDeferMetadata(): Promise<void> {}

  async readInto(buf: Uint8Array, offset: number, opts?: ReadOptions): Promise<void> {
    this.checkRange(offset, buf.length);
    const n = await this.lock.shared(() => this.file.readInto(buf, offset, opts?.background));
    if (n < buf.length) buf.fill(0, n); // a file shorter than its size reads as zeros past its end
  }

  /** FUA: the write and the fdatasync in one call (ImageFile.writeBatch). */
  async write(offset: number, data: Uint8Array, opts: WriteOptions = {}): Promise<void> {
    this.writable();
    this.checkRange(offset, data.length);
    await this.lock.shared(() => opts.fua ? this.file.writeBatch([[offset, data]], true) : this.file.write(offset, data, false, opts.background));
  }

  /**
   * Copy [srcPos, guest, length] triples (`ops`) straight from another file with the native
   * copy (ImageFile.copyIn), leaving out the 4 KiB blocks that are all zero (qemu-img's `-S 4k`):
   * for `convert` into a new file, which reads as zero where nothing is written.
   */
  async copyFromFile(src: ImageFile, ops: Float64Array, until?: Float64Array): Promise<void> {
    this.writable();
    for (let i = 0; i < ops.length; i += 3) this.checkRange(ops[i + 1]!, ops[i + 2]!);
    await this.lock.shared(() => this.file.copyIn(src, ops, { block: HOLE_BLOCK, ...(until ? { until } : {}) }));
  }

  writeCompressed(): Promise<void> {
    return Promise.reject(new Unsupported('Compression not supported for this file format', { ref: this.path, hint: 'compressed clusters are a qcow2 feature: write a qcow2 image' }));
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.writable();
    this.checkRange(offset, length);
    await this.lock.shared(async () => {
      for (let p = offset; p < offset + length; p += CHUNK) {
        await this.file.write(p, new Uint8Array(Math.min(CHUNK, offset + length - p)));
      }
    });
  }

  /** Raw files cannot punch holes from here; a discard reads back as zeros, as QEMU's does. */
  async discard(offset: number, length: number): Promise<void> {
    await this.writeZeroes(offset, length);
  }

  /**
   * Data vs holes, as `qemu-img map` shows a raw file: data where the file system holds data, a
   * hole (zero) elsewhere, from lseek SEEK_DATA/SEEK_HOLE (the native helper, see seek-data.ts).
   * Without it: a fully allocated file is all data; a sparse one reports all-zero 4 KiB blocks
   * as holes (read from the content, so a written block of zeros is a hole here).
   */
  async blockStatus(offset = 0, length?: number): Promise<BlockStatus[]> {
    const len = length ?? this.virtualSize - offset;
    this.checkRange(offset, len);
    return this.lock.shared(async () => this.seekStatus(offset, len) ?? (await this.scanStatus(offset, len)));
  }

  /**
   * The block status from the file system's own allocation map, or undefined when it is not
   * available (no native helper, or a file system that cannot seek holes). Costs no reads:
   * `convert` uses it to skip the holes of a raw source.
   */
  async exactBlockStatus(offset = 0, length?: number): Promise<BlockStatus[] | undefined> {
    const len = length ?? this.virtualSize - offset;
    this.checkRange(offset, len);
    return this.lock.shared(async () => this.seekStatus(offset, len));
  }

  private status(start: number, length: number, data: boolean): BlockStatus {
    return { start, length, depth: 0, present: true, zero: !data, data, compressed: false, offset: start, filename: this.path };
  }

  private seekStatus(offset: number, len: number): BlockStatus[] | undefined {
    const end = offset + len;
    const extents = this.file.dataExtents(offset, end);
    if (!extents) return undefined;
    const out: BlockStatus[] = [];
    let pos = offset;
    for (const [from, to] of extents) {
      if (from > pos) out.push(this.status(pos, from - pos, false));
      out.push(this.status(from, to - from, true));
      pos = to;
    }
    if (pos < end) out.push(this.status(pos, end - pos, false));
    return mergeStatus(out);
  }

  /** The fallback: holes guessed from the content of a sparse file. */
  private async scanStatus(offset: number, len: number): Promise<BlockStatus[]> {
    const st = await this.file.stat();
    const sparse = st.blocks * 512 < st.size;
    const out: BlockStatus[] = [];
    const push = (start: number, n: number, data: boolean) => out.push(this.status(start, n, data));
    if (!sparse) {
      if (len > 0) push(offset, len, true);
      return out;
    }
    for (let p = offset; p < offset + len; p += CHUNK) {
      const n = Math.min(CHUNK, offset + len - p);
      const buf = await this.file.read(p, n);
      if (p % HOLE_BLOCK === 0) {
        // Block-aligned: the fast scan (CHUNK is a multiple of HOLE_BLOCK, so blocks line up).
        let q = p;
        for (const [from, to] of nonZeroRuns(buf)) {
          if (p + from > q) push(q, p + from - q, false);
          push(p + from, to - from, true);
          q = p + to;
        }
        if (q < p + n) push(q, p + n - q, false);
        continue;
      }
      let q = p;
      while (q < p + n) {
        const blockEnd = Math.min(p + n, (Math.floor(q / HOLE_BLOCK) + 1) * HOLE_BLOCK);
        const piece = buf.subarray(q - p, blockEnd - p);
        push(q, blockEnd - q, piece.some((x) => x !== 0));
        q = blockEnd;
      }
    }
    return mergeStatus(out);
  }

  map(): Promise<BlockStatus[]> {
    return this.blockStatus(0, this.virtualSize);
  }

  async resize(newSize: number): Promise<void> {
    this.writable();
    if (!Number.isSafeInteger(newSize) || newSize < 0) throw new InvalidArgument(`${this.path}: bad size ${newSize}`, { ref: this.path });
    await this.lock.exclusive(async () => {
      await this.file.truncate(newSize);
      this.virtualSize = newSize;
    });
  }

  async flush(opts?: FlushOptions): Promise<void> {
    if (!this.readOnly) await this.file.sync(opts?.background);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.lock.exclusive(async () => {
      this.closed = true;
      await this.file.close();
    });
  }

  fileSize(): Promise<number> {
    return this.file.size();
  }

  readonly snapshots: SnapshotOps = {
    list: async () => [],
    create: async () => this.noSnapshots(),
    apply: async () => this.noSnapshots(),
    delete: async () => this.noSnapshots(),
  };

  readonly bitmaps: BitmapOps = {
    info: async () => [],
    add: async () => this.noBitmaps(),
    remove: async () => this.noBitmaps(),
    clear: async () => this.noBitmaps(),
    enable: async () => this.noBitmaps(),
    disable: async () => this.noBitmaps(),
    merge: async () => this.noBitmaps(),
    dirtyExtents: async () => this.noBitmaps(),
  };

  private noBitmaps(): never {
    throw new Unsupported(`${this.path}: raw images have no dirty bitmaps`, { ref: this.path, hint: 'use a qcow2 image' });
  }

  private noSnapshots(): never {
    throw new Unsupported(`${this.path}: raw images have no internal snapshots`, { ref: this.path, hint: 'use a qcow2 image' });
  }

  async check(): Promise<CheckResult> {
    throw new Unsupported(`${this.path}: this image format (raw) does not support checks`, { ref: this.path });
  }

  // ---- block-job surface: a raw layer allocates every byte (its holes read as zeros) ----

  async ownAllocations(offset: number, length: number): Promise<Allocation[]> {
    return (await this.blockStatus(offset, length)).map((st) => ({ start: st.start, length: st.length, zero: st.zero }));
  }

  /** Nothing in a raw image is unallocated: nothing to fill. */
  async fillUnallocated(offset: number, data: Uint8Array): Promise<number> {
    this.writable();
    this.checkRange(offset, data.length);
    return 0;
  }

  async zeroUnallocated(offset: number, length: number): Promise<void> {
    this.writable();
    this.checkRange(offset, length);
  }

  async makeEmpty(): Promise<void> {
    throw new Unsupported(`${this.path}: a raw image cannot be made empty (it has no backing file to fall through to)`, { ref: this.path });
  }

  async setBacking(): Promise<void> {
    throw new Unsupported(`${this.path}: raw images have no backing file`, { ref: this.path, hint: 'use a qcow2 overlay' });
  }
}
