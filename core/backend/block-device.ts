import type { Extent } from '../model/types.js';

/**
 * The data path of a volume: byte ranges and the allocation map. The host data mover copies
 * between two BlockDevices using only `extents`, `read`, `write` and `writeZeroes`.
 */
export interface BlockDevice {
  readonly sizeBytes: number;
  /** Preferred I/O granularity (cluster size, block size); 0 or absent when any size is fine. */
  readonly blockSize?: number;
  read(offset: number, length: number): Promise<Uint8Array>;
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Make a range read as zeros without sending zeros, where the device can. */
  writeZeroes?(offset: number, length: number): Promise<void>;
  /** Allocated ranges within [offset, offset+length), in order. */
  extents(offset?: number, length?: number): Promise<Extent[]>;
  flush(): Promise<void>;
  close(): Promise<void>;
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
