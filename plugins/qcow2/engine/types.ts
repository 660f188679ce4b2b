/**
 * The public shapes of the qcow2 engine: what `createImage`/`openImage` take and what an open
 * `Image` offers. Offsets and lengths are plain numbers of bytes (exact up to 2^53, far beyond
 * any real file); the engine decodes 64-bit table entries with exact arithmetic.
 */
import type { Header } from '../format/header.js';

export type ImageFormat = 'qcow2' | 'raw';

export interface CreateOptions {
  /** `qcow2` (default) or `raw`. */
  format?: ImageFormat;
  /** Virtual size in bytes. Optional when a backing file is given (taken from it). */
  size?: number;
  /** qcow2 cluster size: a power of two, 512 … 2 MiB (default 64 KiB). */
  clusterSize?: number;
  /** `1.1` (v3, default) or `0.10` (v2). */
  compat?: '0.10' | '1.1';
  /** v3 only. */
  lazyRefcounts?: boolean;
  /** 1, 2, 4, 8, 16 (default), 32 or 64; v2 allows 16 only. */
  refcountBits?: number;
  /** The backing file name as stored in the header (relative names resolve against the new image's folder). */
  backingFile?: string;
  /** The backing file's format; stored as the backing-format extension. Probed when absent. */
  backingFormat?: ImageFormat;
  /** How compressed clusters are coded: `zlib` (deflate, default) or `zstd` (v3 only). */
  compressionType?: 'zlib' | 'zstd';
  /** Overwrite an existing file (default false → AlreadyExists). */
  overwrite?: boolean;
}

export interface OpenOptions {
  /** Default true. */
  readOnly?: boolean;
  /** Force the format instead of probing (`raw` never probes). */
  format?: ImageFormat;
  /**
   * When set, every file of the backing chain must lie inside this folder (after resolving
   * symlinks); a backing reference that leaves it is `Unsupported`.
   */
  allowedRoot?: string;
  /** Do not open the backing chain (reads of unallocated clusters return zeros). */
  noBacking?: boolean;
  /** Deepest backing chain accepted (default 64): beyond it, `Corrupt`. */
  maxChainDepth?: number;
  /** Bytes of L2 and refcount-block cache per image (default 8 MiB). */
  cacheBytes?: number;
  /**
   * QEMU's cache modes, as far as they concern us. `writeback` (default): flush() and close()
   * make every write durable (fdatasync). `unsafe`: flushes are skipped, as `qemu-img convert`
   * does by default — the writes still reach the file in crash-safe order, so a killed process
   * loses nothing, but a power cut may.
   */
  cache?: 'writeback' | 'unsafe';
  /**
   * Keep changed L2 tables and refcount blocks in memory and write them, in crash-safe order, on
   * flushMetadata(), flush(), close(), or when more than half the cache is dirty — as QEMU's
   * qcow2 metadata cache does. A killed process then loses the writes since the last of these
   * (the file is never corrupt: at most leaks). For a process that owns the image: another
   * process reading the file meanwhile sees the older mapping. Default off (written through).
   */
  deferMetadata?: boolean;
  /**
   * For a caller that writes a lot and then flushes (the chain jobs): every 32 MiB written, start
   * an fdatasync in the background, so the device works while the writes go on instead of all at
   * the final flush. Durability is unchanged: only flush() promises it. Default off.
   */
  writeBehind?: boolean;
}

/** `background`: a bulk copy's read (see core's IoOptions); its data is read on a low-priority thread. */
export interface ReadOptions {
  background?: boolean;
}

/**
 * `background`: a bulk copy's flush (see core's IoOptions): the file is written back a slice at a
 * time on the low-priority thread, then synced there; as durable as any flush.
 */
export interface FlushOptions {
  background?: boolean;
}

/** Image.close: `writeNothing` drops what is held in memory instead of writing it. */
export interface CloseOptions {
  writeNothing?: boolean;
}

export interface WriteOptions {
  /** A bulk copy's write (see core's IoOptions): its data is written on a low-priority thread. */
  background?: boolean;
  /**
   * Force unit access (NBD's FUA): resolve only once the write is durable, as write() then
   * flush() would promise — with the native helper, qcow2 with written-through metadata and raw
   * make the write's file writes and the fdatasync in one thread-pool round trip (see
   * plugins/qcow2/README.md, "Writes through an export"); otherwise it is write() then flush().
   */
  fua?: boolean;
}

export interface HeaderExtensionInfo {
  type: number;
  length: number;
}

/** The header fields that HeaderInfo shows as they are stored. */
type StoredHeaderFields = 'version' | 'clusterBits' | 'cryptMethod' | 'l1Size' | 'l1TableOffset' |
  'refcountTableOffset' | 'refcountTableClusters' | 'nbSnapshots' | 'snapshotsOffset' | 'incompatibleFeatures' |
  'compatibleFeatures' | 'autoclearFeatures' | 'refcountOrder' | 'headerLength' | 'compressionType';

/** The decoded qcow2 header, as `qemu-img info` needs it: the stored fields plus derived ones. */
export interface HeaderInfo extends Pick<Header, StoredHeaderFields> {
  clusterSize: number;
  virtualSize: number;
  refcountBits: number;
  /** Backing file name exactly as stored (undefined when none). */
  backingFile?: string;
  /** From the backing-format extension. */
  backingFormat?: string;
  lazyRefcounts: boolean;
  dirty: boolean;
  corrupt: boolean;
  extendedL2: boolean;
  extensions: HeaderExtensionInfo[];
}

/** One image of an open chain, top first. */
export interface ChainEntry {
  /** The path the engine opened (absolute). */
  filename: string;
  format: ImageFormat;
  virtualSize: number;
  /** Backing name as stored in this image's header. */
  backingFilename?: string;
  /** The backing name resolved to a path (what qemu-img calls full-backing-filename). */
  fullBackingFilename?: string;
  backingFormat?: string;
}

/**
 * Allocation status of a guest range, as `qemu-img map` reports it. `depth` is the chain
 * depth the data comes from (0 = this image; the chain length when nothing is allocated);
 * `offset` is the host offset in that layer's file when the data lives there plainly.
 */
export interface BlockStatus {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  compressed: boolean;
  offset?: number;
  /** The file of the layer at `depth` (when present). */
  filename?: string;
}

export interface SnapshotInfo {
  id: string;
  name: string;
  /** Bytes of saved VM state (0 for disk-only snapshots). */
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  /** Guest virtual size at snapshot time (v3 extra data; absent on v2). */
  diskSize?: number;
  icount?: number;
  l1Size: number;
}

/** The counters `qemu-img check` prints, same meaning. */
export interface CheckResult {
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  /** Cluster-aligned end of the highest used cluster. */
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** Human lines in qemu-img's wording (`Leaked cluster 5 refcount=1 reference=0`, …). */
  messages: string[];
  /** True when repair rebuilt the whole refcount structure. */
  rebuilt: boolean;
  /**
   * Set when the check itself failed (qemu-img prints `Check failed: …`, no JSON, exit 1):
   * e.g. `-r leaks` on an image whose refcount structure needs a rebuild.
   */
  error?: string;
}

/**
 * `repair: 'leaks'` = `qemu-img check -r leaks`, `'all'` = `-r all`. As qemu-img reports it,
 * when a repair fixed something the counts returned are those of a fresh check afterwards,
 * with `leaksFixed`/`corruptionsFixed` from the repair. `error` set = qemu-img's "Check failed".
 */
export interface CheckOptions {
  repair?: 'leaks' | 'all';
}

export interface SnapshotOps {
  list(): Promise<SnapshotInfo[]>;
  /** Take an internal snapshot of the active state; returns it (IDs "1", "2", … like QEMU). */
  create(name: string): Promise<SnapshotInfo>;
  /** Revert the active state to a snapshot (by name or ID). */
  apply(nameOrId: string): Promise<void>;
  delete(nameOrId: string): Promise<void>;
}

/** A byte range (a bitmap's dirty extents). */
export interface ByteRange {
  offset: number;
  length: number;
}

/** A persistent dirty bitmap as `qemu-img info` shows it. */
export interface BitmapInfo {
  name: string;
  granularity: number;
  /** The `auto` flag: writes mark it ("recording"). */
  enabled: boolean;
  /** Found `in_use`: its writer did not close the image cleanly; it may miss writes and is never used. */
  inconsistent: boolean;
  /** qemu-img's flag names, in its order: `in-use`, `auto`. */
  flags: ('in-use' | 'auto')[];
}

/**
 * Persistent dirty bitmaps in QEMU's format (qcow2 only; a raw image has none, and changing one
 * is Unsupported). Every change is stored at once; the bits of enabled bitmaps are kept in
 * memory while the image is open read-write and stored at close (bitmaps.ts).
 */
export interface BitmapOps {
  info(): Promise<BitmapInfo[]>;
  /** `qemu-img bitmap --add [-g G] [--disable]`: default granularity max(4 KiB, cluster size). */
  add(name: string, opts?: { granularity?: number; disabled?: boolean }): Promise<void>;
  remove(name: string): Promise<void>;
  clear(name: string): Promise<void>;
  enable(name: string): Promise<void>;
  disable(name: string): Promise<void>;
  /** Add the dirty bits of `from` (of this or another image of the same size) to `into`. */
  merge(into: string, from: { image: Image; name: string }): Promise<void>;
  /**
   * The dirty ranges of a bitmap within a range, in whole granules clipped to it. An inconsistent
   * bitmap answers the whole range: everything may have changed.
   */
  dirtyExtents(name: string, offset?: number, length?: number): Promise<ByteRange[]>;
}

/**
 * A range some layers of a chain allocate (see Image.allocatedAbove): its content comes from
 * those layers, not from below them. `zero`: it reads as zeros there (zero clusters, holes).
 */
export interface Allocation {
  start: number;
  length: number;
  zero: boolean;
}

/**
 * Guest ranges written through an image since they were last taken (Image.trackWrites), at a
 * fixed granularity: what QEMU hands a mirror job as its dirty bitmap.
 */
export interface DirtyMap {
  readonly granularity: number;
  /**
   * Every dirty run as it is now (each at most maxBytes), cleared. Writes that land later are
   * left for the next call, so a pass ends even while writers keep going.
   */
  takeAll(maxBytes: number): { start: number; end: number }[];
  /** Mark a range dirty again (a copy of it failed, or the caller's own change). */
  mark(offset: number, length: number): void;
  empty(): boolean;
  /** Resolves at the next mark. */
  changed(): Promise<void>;
  /** Stop tracking (the map is no longer marked). */
  stop(): void;
}

/** The new backing of an image (Image.setBacking). */
export interface NewBacking {
  /** Name stored in the header, as given (relative names resolve against the image's folder); undefined = none. */
  name: string | undefined;
  format?: ImageFormat | undefined;
  /** The new backing image, already open read-only; the image takes it over (and closes the old one). */
  image?: Image | undefined;
}

/** An open image (qcow2 or raw) with its backing chain. */
export interface Image {
  readonly path: string;
  readonly format: ImageFormat;
  readonly readOnly: boolean;
  readonly virtualSize: number;
  /** qcow2 cluster size; 512 for raw (its natural I/O granularity). */
  readonly clusterSize: number;
  /** qcow2 only. A snapshot of the header as it is now. */
  readonly header: HeaderInfo | undefined;
  /** The backing image, already open (read-only), if any. */
  readonly backing: Image | undefined;
  /** This image then its backing images, top first (built afresh on each read). */
  readonly chain: ChainEntry[];

  read(offset: number, length: number, opts?: ReadOptions): Promise<Uint8Array>;
  /**
   * Read `buf.length` bytes at `offset` into `buf` (every byte is set: holes and zero clusters
   * are filled with zeros). Lets a copy loop reuse its buffers instead of allocating per read.
   */
  readInto(buf: Uint8Array, offset: number, opts?: ReadOptions): Promise<void>;
  /** Write `data` at `offset`; `fua`: resolve only once it is durable (see WriteOptions). */
  write(offset: number, data: Uint8Array, opts?: WriteOptions): Promise<void>;
  /**
   * Write whole clusters (the last may end at the virtual size) as compressed clusters, each one
   * deflate does not shrink as a normal cluster (`convert -c`). qcow2 only, where nothing is
   * allocated (FailedPrecondition otherwise); raw: Unsupported.
   */
  writeCompressed(offset: number, data: Uint8Array): Promise<void>;
  /** Make a range read as zeros: zero flag on v3, zeroed clusters on v2, zero bytes on raw. */
  writeZeroes(offset: number, length: number): Promise<void>;
  /**
   * Drop the data of the whole clusters in a range (partial clusters are left alone, as QEMU
   * does). v3: they then read as zeros (zero flag). v2: they read from the backing file (or zeros).
   */
  discard(offset: number, length: number): Promise<void>;
  /** Allocation status of [offset, offset+length), merged like `qemu-img map`. */
  blockStatus(offset?: number, length?: number): Promise<BlockStatus[]>;
  /** blockStatus over the whole image. */
  map(): Promise<BlockStatus[]>;
  /** Grow; shrink only when nothing is allocated past the new end (else OutOfRange). */
  resize(newSize: number): Promise<void>;
  /**
   * Write deferred metadata (OpenOptions.deferMetadata) to the file, without fdatasync: after
   * it a killed process loses nothing written so far. No-op when nothing is deferred.
   */
  flushMetadata(): Promise<void>;
  /**
   * Defer metadata (as OpenOptions.deferMetadata) from now on, or stop: off writes what is held
   * first (no fdatasync). While on, a killed process loses the writes made since the last flush,
   * and another process reading the file does not see them. Read-only and raw images ignore it.
   */
  setDeferMetadata(on: boolean): Promise<void>;
  /** flushMetadata(), then fdatasync (skipped with cache `unsafe`). */
  flush(opts?: FlushOptions): Promise<void>;
  /**
   * Flush (as flush()) and close. `writeNothing`: close without writing anything more — metadata
   * held in memory (deferred), bitmaps' state — for a writer that no longer owns the file (its
   * job's lease ran out: another runner writes it now); the file stays as its last flush left it.
   */
  close(opts?: CloseOptions): Promise<void>;
  /** Size of the image file in bytes. */
  fileSize(): Promise<number>;
  readonly snapshots: SnapshotOps;
  readonly bitmaps: BitmapOps;
  check(opts?: CheckOptions): Promise<CheckResult>;

  // ---- the block-job surface (QEMU's block layer gives the same to stream.c, commit.c, mirror.c) ----

  /**
   * bdrv_is_allocated_above: the ranges of [offset, offset+length) that this image or a layer of
   * its chain above `base` allocates, merged, in order. `base` must be a layer of this chain
   * (undefined: the whole chain counts; this image's own backing: this image alone). A raw layer
   * allocates everything (its holes as zero ranges).
   */
  allocatedAbove(offset: number, length: number, base?: Image): Promise<Allocation[]>;
  /**
   * Copy-on-read: write `data` (what the chain reads at `offset` now) into the clusters of the
   * range that this image still leaves unallocated, and only those: a guest write that got to a
   * cluster first wins. Returns the bytes written. qcow2 only (raw allocates everything: 0).
   */
  fillUnallocated(offset: number, data: Uint8Array): Promise<number>;
  /**
   * Make the clusters of the range that this image leaves unallocated read as zeros (the zero
   * flag on v3, zero bytes on v2) without touching allocated ones. qcow2 only (raw: nothing to do).
   */
  zeroUnallocated(offset: number, length: number): Promise<void>;
  /** Unallocate every cluster of the active state (reads then come from the backing), then flush. qcow2 only. */
  makeEmpty(): Promise<void>;
  /**
   * Point this image at another backing file, on disk and in memory. What the new reference
   * depends on must be on disk already: the image is flushed first, then its header is rewritten
   * in one write of its first cluster, then flushed again, so a kill leaves the old or the new
   * header. Works on a read-only layer of a chain too (its header is written through a private
   * read-write handle). qcow2 only.
   */
  setBacking(next: NewBacking): Promise<void>;
  /** Observe writes: a map of every range written, zeroed or discarded through this image from now on. */
  trackWrites(granularity: number): DirtyMap;
  /**
   * Replace the image behind this object by `target` (the pivot of an active commit or mirror):
   * new calls are held, calls in flight are waited for, `final` runs (with the old image, which
   * it may read), the old image closes (with its chain), and from then on every call on this
   * object goes to `target`'s image. `target` is taken over: do not use or close it afterwards.
   * If `final` fails, nothing switches and the held calls go on against the old image.
   */
  pivot(target: Image, final?: (old: Image) => Promise<void>): Promise<void>;
}
