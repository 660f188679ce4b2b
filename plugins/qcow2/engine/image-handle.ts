import { FailedPrecondition, InvalidArgument } from '../../../core/index.js';
import { DirtyBitmap } from './dirty-map.js';
import type { ImageNode } from './image-node.js';
import type {
  Allocation, BlockStatus, ChainEntry, CheckOptions, CheckResult, DirtyMap, HeaderInfo, Image, ImageFormat, NewBacking, BitmapOps, SnapshotOps,
  CloseOptions, FlushOptions, ReadOptions, WriteOptions,
} from './types.js';

/**
 * The Image every caller holds: one per open layer, forwarding to the format's node (Qcow2Image,
 * RawImage), as QEMU's BlockBackend stands in front of a BlockDriverState. It adds what a block
 * job needs from the object a guest uses: a map of the writes that go through it (trackWrites),
 * the switch to another image while callers keep the object (pivot), and allocation above a base
 * layer of the chain (allocatedAbove).
 */
export class ImageHandle implements Image {
  private node: ImageNode | undefined;
  private inflight = 0;
  private held: Promise<void> | undefined;
  private drained: (() => void) | undefined;
  private readonly trackers = new Set<DirtyBitmap>();
  /** Set when another handle's pivot took this one's image over. */
  private takenBy: string | undefined;

  constructor(node: ImageNode) {
    this.node = node;
  }

  /** The node behind a handle, for the engine's own fast paths (the native copy). */
  static nodeOf(image: Image): ImageNode | undefined {
    return image instanceof ImageHandle ? image.node : undefined;
  }

  private get n(): ImageNode {
    if (!this.node) {
      throw new FailedPrecondition(`this image was taken over by the pivot of ${this.takenBy}; use that image instead`, { ref: this.takenBy });
    }
    return this.node;
  }

  get path(): string { return this.n.path; }
  get format(): ImageFormat { return this.n.format; }
  get readOnly(): boolean { return this.n.readOnly; }
  get virtualSize(): number { return this.n.virtualSize; }
  get clusterSize(): number { return this.n.clusterSize; }
  get header(): HeaderInfo | undefined { return this.n.header; }
  get backing(): Image | undefined { return this.n.backing; }
  get chain(): ChainEntry[] { return this.n.chain; }
  get snapshots(): SnapshotOps { return this.n.snapshots; }
  get bitmaps(): BitmapOps { return this.n.bitmaps; }

  /**
   * Run a call on the node: held while a pivot switches nodes, counted while in flight. Not an
   * async function: the jobs make thousands of calls a second, and the usual path (nothing held)
   * adds one promise, not a suspended frame.
   */
  private call<T>(fn: (node: ImageNode) => Promise<T>): Promise<T> {
    if (this.held || !this.node) return this.callWhenFree(fn);
    this.inflight++;
    return fn(this.node).finally(this.leave);
  }

  private async callWhenFree<T>(fn: (node: ImageNode) => Promise<T>): Promise<T> {
    while (this.held) await this.held;
    const node = this.n;
    this.inflight++;
    return fn(node).finally(this.leave);
  }

  private readonly leave = (): void => {
    if (--this.inflight === 0) this.drained?.();
  };

  /**
   * A call that changes content: its range is marked, once it ends (also when it failed half-way),
   * in every tracker there is then — a tracker started while the write was in flight sees it too.
   * Marked before the call counts as done, so a pivot's last pass never misses it.
   */
  private changing(offset: number, length: number, fn: (node: ImageNode) => Promise<void>): Promise<void> {
    return this.call((node) => fn(node).finally(() => {
      for (const t of this.trackers) t.mark(offset, length);
    }));
  }

  read(offset: number, length: number, opts?: ReadOptions): Promise<Uint8Array> { return this.call((n) => n.read(offset, length, opts)); }
  readInto(buf: Uint8Array, offset: number, opts?: ReadOptions): Promise<void> { return this.call((n) => n.readInto(buf, offset, opts)); }
  write(offset: number, data: Uint8Array, opts?: WriteOptions): Promise<void> {
    return this.changing(offset, data.length, (n) => n.write(offset, data, opts));
  }
  writeCompressed(offset: number, data: Uint8Array): Promise<void> { return this.changing(offset, data.length, (n) => n.writeCompressed(offset, data)); }
  writeZeroes(offset: number, length: number): Promise<void> { return this.changing(offset, length, (n) => n.writeZeroes(offset, length)); }
  discard(offset: number, length: number): Promise<void> { return this.changing(offset, length, (n) => n.discard(offset, length)); }
  blockStatus(offset?: number, length?: number): Promise<BlockStatus[]> { return this.call((n) => n.blockStatus(offset, length)); }
  map(): Promise<BlockStatus[]> { return this.call((n) => n.map()); }
  resize(newSize: number): Promise<void> { return this.call((n) => n.resize(newSize)); }
  flushMetadata(): Promise<void> { return this.call((n) => n.flushMetadata()); }
  setDeferMetadata(on: boolean): Promise<void> { return this.call((n) => n.setDeferMetadata(on)); }
  flush(opts?: FlushOptions): Promise<void> { return this.call((n) => n.flush(opts)); }
  fileSize(): Promise<number> { return this.call((n) => n.fileSize()); }
  check(opts?: CheckOptions): Promise<CheckResult> { return this.call((n) => n.check(opts)); }
  fillUnallocated(offset: number, data: Uint8Array): Promise<number> { return this.call((n) => n.fillUnallocated(offset, data)); }
  zeroUnallocated(offset: number, length: number): Promise<void> { return this.call((n) => n.zeroUnallocated(offset, length)); }
  makeEmpty(): Promise<void> { return this.call((n) => n.makeEmpty()); }
  setBacking(next: NewBacking): Promise<void> { return this.call((n) => n.setBacking(next)); }

  async close(opts?: CloseOptions): Promise<void> {
    if (!this.node) return; // taken over by a pivot: the other handle closes the image
    await this.call((n) => n.close(opts));
  }

  async allocatedAbove(offset: number, length: number, base?: Image): Promise<Allocation[]> {
    const node = this.n;
    if (base === node.backing) return this.call((n) => n.ownAllocations(offset, length));
    // The depth (in this image's block status) of `base`: ranges from shallower layers count.
    let limit = Infinity;
    if (base !== undefined) {
      let depth = 1;
      for (let l = node.backing; l && limit === Infinity; l = l.backing, depth++) if (l === base) limit = depth;
      if (limit === Infinity) {
        throw new InvalidArgument(`${this.path}: ${base.path} is not a backing layer of this image`, { ref: this.path, hint: 'pass a layer of image.backing…' });
      }
    }
    const out: Allocation[] = [];
    for (const st of await this.blockStatus(offset, length)) {
      if (!st.present || st.depth >= limit) continue;
      const last = out[out.length - 1];
      if (last && last.zero === st.zero && last.start + last.length === st.start) last.length += st.length;
      else out.push({ start: st.start, length: st.length, zero: st.zero });
    }
    return out;
  }

  trackWrites(granularity: number): DirtyMap {
    const map = new DirtyBitmap(granularity, this.n.virtualSize, (m) => this.trackers.delete(m));
    this.trackers.add(map);
    return map;
  }

  async pivot(target: Image, final?: (old: Image) => Promise<void>): Promise<void> {
    if (!(target instanceof ImageHandle) || target === this || !target.node) {
      throw new InvalidArgument(`${this.path}: pivot needs another open image of the engine`, { ref: this.path });
    }
    const release = await this.quiesce();
    try {
      const old = this.n;
      if (final) await final(new ImageHandle(old));
      await old.close().catch(() => undefined); // its data is in `target` now; a failed close changes nothing
      this.node = target.node;
      target.node = undefined;
      target.takenBy = this.node.path;
    } finally {
      release();
    }
  }

  /** Hold new calls and wait until none is in flight; returns the release. */
  private async quiesce(): Promise<() => void> {
    while (this.held) await this.held;
    let release!: () => void;
    this.held = new Promise<void>((r) => { release = r; });
    if (this.inflight > 0) await new Promise<void>((r) => { this.drained = r; });
    this.drained = undefined;
    return () => {
      this.held = undefined;
      release();
    };
  }
}
