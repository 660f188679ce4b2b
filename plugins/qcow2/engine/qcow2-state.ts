import { FailedPrecondition, InvalidArgument, OutOfRange, RwLock } from '../../../core/index.js';
import { getU64, setU64, view } from '../format/bytes.js';
import { encodeHeader, type Header } from '../format/header.js';
import type { SnapshotEntry } from '../format/snapshot-table.js';
import type { ImageFile } from './file.js';
import { MetadataCache } from './metadata-cache.js';
import { Refcounts } from './refcounts.js';
import { TableCache } from './table-cache.js';
import type { ChainEntry, Image } from './types.js';

/** What open.ts read from the file, to build an image's state from. */
export interface Qcow2Parts {
  path: string;
  file: ImageFile;
  header: Header;
  l1: Uint8Array;
  reftable: Uint8Array;
  snapshots: SnapshotEntry[];
  backing: Image | undefined;
  /** This layer's own entry of the chain (the layers below add theirs). */
  entry: ChainEntry;
  readOnly: boolean;
  fileSize: number;
  cacheBytes: number;
  /** OpenOptions.deferMetadata. */
  deferMetadata?: boolean;
}

/** What the other parts need of the persistent bitmaps (bitmaps.ts, which builds on this state). */
export interface StateBitmaps {
  /** Clusters the bitmaps use on disk: a refcount rebuild counts them. */
  clusters(): Promise<number[]>;
  /** The content was replaced (a snapshot applied): every recording bitmap marks everything. */
  markAll(): void;
  assertResizable(): void;
  resize(newSize: number): void;
}

/**
 * The state of one open qcow2 image, shared by its parts: the cluster map (cluster-map.ts),
 * reads (cluster-read.ts), writes (cluster-write.ts), resize, snapshots and check. Qcow2Image is
 * the thin public face over it. Invariants every part keeps:
 * - `h` and `l1` are the header and active L1 as they are on disk, except for L1 entries the
 *   metadata cache holds dirty in deferred mode (newer in memory, written at its next flush);
 *   a change of header fields is written to disk (writeHeader or a field write) before or with
 *   the in-memory change, never after a reader could act on it.
 * - Writes to the file follow the crash-safe order: data before the L2 entry that points at it,
 *   L2 before L1, refcount increments before the reference, decrements after it.
 * - Every change of the mapping holds `lock` exclusively, except allocating writes that free
 *   nothing reused before an exclusive step (deferred-mode guest writes, and in either mode guest
 *   writes and copy-on-read fills of clusters with no host cluster behind them): those hold it shared and take `metaLock` for their
 *   metadata steps, with `inflight` naming the guest clusters whose new space is being written
 *   (no other allocating write touches them).
 * - `fileLen` is at least the end of everything written to the file.
 */
export class Qcow2State {
  readonly path: string;
  readonly file: ImageFile;
  readonly readOnly: boolean;
  /** The backing image (already open, read-only); changed only by setBacking. */
  backing: Image | undefined;
  /** This layer's entry of the chain; its backing fields change with setBacking. */
  entry: ChainEntry;
  h: Header;
  l1: Uint8Array;
  snapshotTable: SnapshotEntry[];
  /** Bytes in the file as far as we know (grows with our writes). */
  fileLen: number;
  closed = false;
  /** Set when the tables could not be read back after a failed batch (reloadTables): only close() works. */
  failed: unknown;
  readonly lock = new RwLock();
  /** The metadata steps of allocating writes that run under the shared lock (see above). */
  readonly metaLock = new RwLock();
  readonly inflight = new Set<number>();
  /**
   * Where the next compressed cluster may go: the end of the last one written, inside a host
   * cluster it shares with them (QEMU's free_byte_offset); 0 when there is none.
   */
  compressedTail = 0;
  readonly refcounts: Refcounts;
  readonly meta: MetadataCache;
  /** Persistent dirty bitmaps (bitmaps.ts); loaded by Qcow2Image.init. */
  readonly bitmaps: StateBitmaps;

  constructor(p: Qcow2Parts, bitmaps: (s: Qcow2State) => StateBitmaps) {
    this.path = p.path;
    this.file = p.file;
    this.readOnly = p.readOnly;
    this.backing = p.backing;
    this.entry = p.entry;
    this.h = p.header;
    this.l1 = p.l1;
    this.snapshotTable = p.snapshots;
    this.fileLen = p.fileSize;
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
    this.meta = new MetadataCache(this.file, this.refcounts, this, this.cs, p.cacheBytes, p.deferMetadata === true && !p.readOnly);
    this.refcounts.onZero = (off) => {
      this.meta.forget(off);
      // A freed cluster may be handed out whole: no compressed cluster goes after its data then.
      if (this.compressedTail - (this.compressedTail % this.cs) === off) this.compressedTail = 0;
    };
    // Rebuilt refcounts (a snapshot applied or deleted, a repair) free clusters without onZero.
    this.refcounts.onReset = () => { this.compressedTail = 0; };
    this.bitmaps = bitmaps(this);
  }

  get cs(): number { return 1 << this.h.clusterBits; }
  get l2Entries(): number { return this.cs / 8; }
  get l1Size(): number { return this.l1.length / 8; }

  checkOpen(): void {
    if (this.closed) throw new FailedPrecondition(`${this.path}: image is closed`, { ref: this.path });
    if (this.failed !== undefined) {
      throw new FailedPrecondition(`${this.path}: a write failed and the image's tables could not be read back`, {
        ref: this.path, hint: 'close the image and open it again', cause: this.failed,
      });
    }
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

  /**
   * After a batch of writes failed part-way (ImageFile.batch, cluster-write.ts writeDurable): the
   * file holds the first of them, in crash-safe order — what a crash then would have left, a
   * consistent image — while the tables in memory hold them all. Read the tables back from the
   * file, as an open does: the L1 table, the refcount table and where the header puts it (the one
   * header change a write can make: Refcounts.growTable), and no cached L2 table or refcount
   * block. Written-through metadata only (nothing is held dirty). Failing that, the image refuses
   * everything but close(). Never throws.
   */
  async reloadTables(): Promise<void> {
    try {
      const head = view(await this.file.readExact(0, 64, 'header'));
      const reftableOffset = getU64(head, 48);
      const reftableClusters = head.getUint32(56);
      const l1 = await this.file.readExact(this.h.l1TableOffset, this.l1.length, 'L1 table');
      const reftable = await this.file.readExact(reftableOffset, reftableClusters * this.cs, 'refcount table');
      this.h.refcountTableOffset = reftableOffset;
      this.h.refcountTableClusters = reftableClusters;
      this.l1.set(l1);
      this.refcounts.reset(reftable, reftableOffset, this.refcounts.highWater);
      this.meta.clear();
    } catch (e) {
      this.failed = e;
    }
  }

  /** Rewrite the whole first cluster (QEMU's way). */
  async writeHeader(): Promise<void> {
    await this.file.write(0, encodeHeader(this.h));
  }
}
