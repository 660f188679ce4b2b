import type { Extent } from '../model/types.js';

/** A byte range of a device. */
export interface ByteRange {
  offset: number;
  length: number;
}

/**
 * How a read, a write or a flush is made. `background`: it is a bulk copy's (a live copy's
 * passes, its target's flush before `ready`), which should not hold up the device's other I/O (a
 * guest's): a device may make it on threads of lower priority, write a flush's data back a piece
 * at a time before it syncs, or ignore the hint — the result is the same either way, and a flush
 * is as durable.
 */
export interface IoOptions {
  background?: boolean;
}

/**
 * The data path of a volume: byte ranges and the allocation map. The host data mover (the
 * copier, core/copy/) copies between two BlockDevices using `extents`, `read`, `write` and
 * `writeZeroes`, and `copyFrom` where the target offers a faster way.
 */
export interface BlockDevice {
  readonly sizeBytes: number;
  /** Preferred I/O granularity (cluster size, block size); 0 or absent when any size is fine. */
  readonly blockSize?: number;
  read(offset: number, length: number, opts?: IoOptions): Promise<Uint8Array>;
  /**
   * read() into the caller's buffer, every byte of it written: the NBD server reads into buffers
   * it uses again rather than into a new one per request. Absent: the server calls read().
   */
  readInto?(buf: Uint8Array, offset: number, opts?: IoOptions): Promise<void>;
  write(offset: number, data: Uint8Array, opts?: IoOptions): Promise<void>;
  /**
   * write(), resolved only once the data is durable, as write() then flush() would promise (NBD's
   * FUA), where the device can do that for less than the two calls: the qcow2 engine makes the
   * write's file writes and the fdatasync in one round trip of the thread pool. Absent: the NBD
   * server calls write() then flush(). A method of its own rather than an option of write(), so
   * that a device (or a wrapper) that does not know it cannot drop the durability unnoticed.
   */
  writeFua?(offset: number, data: Uint8Array): Promise<void>;
  /** Make a range read as zeros without sending zeros, where the device can. */
  writeZeroes?(offset: number, length: number): Promise<void>;
  /** Allocated ranges within [offset, offset+length), in order. */
  extents(offset?: number, length?: number): Promise<Extent[]>;
  /**
   * Drop the data of a range where the device can (NBD TRIM): afterwards it reads as zeros or as
   * before, the device's choice. Absent: a trim changes nothing.
   */
  discard?(offset: number, length: number): Promise<void>;
  /**
   * Where each range's data comes from in a layered volume (NBD `qemu:allocation-depth`): 0 not
   * allocated anywhere, 1 the volume's own top layer, 2 the layer below it, and so on.
   */
  allocationDepth?(offset: number, length: number): Promise<{ offset: number; length: number; depth: number }[]>;
  /**
   * The names of the dirty bitmaps the device carries (a qcow2 image's persistent bitmaps), which
   * an NBD export offers as `qemu:dirty-bitmap:NAME`. Absent or empty: none.
   */
  dirtyBitmaps?(): string[];
  /**
   * The dirty ranges of bitmap `name` within [offset, offset+length), in order, in whole units of
   * the bitmap's granularity (clipped to the range). An unknown name is NotFound. A bitmap left
   * inconsistent by a crash is not offered; asked anyway, it answers the whole range dirty or
   * FailedPrecondition — never an answer that may leave a write out.
   */
  dirtyExtents?(name: string, offset: number, length: number): Promise<ByteRange[]>;
  flush(opts?: IoOptions): Promise<void>;
  /**
   * Keep the device's own bookkeeping of writes (a qcow2 image's cluster tables and refcounts) in
   * memory until the next flush (`true`), or write it with each write again (`false`, writing what
   * is held first). While on, a process that dies before a flush loses writes it acknowledged, and
   * other processes reading the volume do not see them: only for a device nothing else uses yet,
   * as a live copy's target before its switch-over, whose writes then wait for no metadata I/O.
   * Optional: a device without it writes through.
   */
  deferMetadata?(on: boolean): Promise<void>;
  /**
   * Flush and close. `writeNothing`: close without writing anything more (what the device holds
   * in memory, deferred metadata, is dropped) — for a job's run that lost its lease, whose target
   * another runner writes now. A device that holds nothing back may ignore it.
   */
  close(opts?: { writeNothing?: boolean }): Promise<void>;
  /**
   * Optional fast path of the copier: copy the data `ranges` of `source` into this device without
   * passing the bytes through JavaScript (both are local files, say). Resolves with the ranges, or
   * parts of them, it left for the copier to copy itself, or undefined when it cannot take this
   * source at all. Called only on a device that reads as zeros wherever nothing was written (a
   * new volume or image), so blocks of zeros may be left out.
   *
   * `opts.until` (a job's JobContext.leaseUntil): nothing may be written once this host's clock
   * reaches until[0], which its owner moves on while the copy runs; past it the copy rejects with
   * LeaseLost. A device that cannot honour it resolves undefined (the copier copies itself).
   */
  copyFrom?(source: BlockDevice, ranges: ByteRange[], opts?: { until?: Float64Array }): Promise<ByteRange[] | undefined>;
}

/** Fill gaps between extents so that a reader sees the whole device described. */
export function clipExtents(extents: Extent[], offset: number, length: number): Extent[] {
  const end = offset + length;
  const out: Extent[] = [];
  for (const e of extents) {
    const s = Math.max(e.offset, offset);
    const t = Math.min(e.offset + e.length, end);
    if (t > s) out.push({ offset: s, length: t - s, kind: e.kind });
  }
  return out;
}
