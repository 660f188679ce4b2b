import { InvalidArgument } from '../model/errors.js';
import type { ByteRange } from '../backend/block-device.js';

/** QEMU's mirror defaults to the target's cluster size, 64 KiB for qcow2: the same here. */
export const DEFAULT_GRANULARITY = 64 * 1024;

/**
 * Which parts of a device changed, one bit per `granularity` bytes (as QEMU's BdrvDirtyBitmap):
 * a write of one byte makes its whole granule dirty. What a live copy copies again, and what a
 * ready mirror must copy before it may pivot.
 */
export class DirtyMap {
  private readonly bits: Uint32Array;
  private readonly granules: number;
  private dirty = 0;
  /** Called after a mark that made something dirty (a copier waiting for work wakes up). */
  onMark: (() => void) | undefined;

  constructor(readonly sizeBytes: number, readonly granularity = DEFAULT_GRANULARITY) {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0) throw new InvalidArgument(`a dirty map covers a whole number of bytes, got ${sizeBytes}`);
    if (!Number.isSafeInteger(granularity) || granularity < 512 || (granularity & (granularity - 1)) !== 0) {
      throw new InvalidArgument(`dirty map granularity must be a power of two ≥ 512 bytes, got ${granularity}`);
    }
    this.granules = Math.ceil(sizeBytes / granularity);
    this.bits = new Uint32Array(Math.ceil(this.granules / 32));
  }

  /** Granules marked dirty. */
  get dirtyGranules(): number {
    return this.dirty;
  }

  /** Bytes those granules cover (the last one may be short). */
  get dirtyBytes(): number {
    if (this.dirty === 0) return 0;
    const last = this.granules - 1;
    const short = this.sizeBytes - last * this.granularity;
    return this.dirty * this.granularity - (this.has(last) ? this.granularity - short : 0);
  }

  /** Mark every granule that [offset, offset+length) touches. */
  mark(offset: number, length: number): void {
    const before = this.dirty;
    this.each(offset, length, (g) => {
      if (!this.has(g)) {
        this.bits[g >>> 5]! |= 1 << (g & 31);
        this.dirty++;
      }
    });
    if (this.dirty > before) this.onMark?.();
  }

  /** Clear every granule that [offset, offset+length) touches. */
  clear(offset: number, length: number): void {
    this.each(offset, length, (g) => {
      if (this.has(g)) {
        this.bits[g >>> 5]! &= ~(1 << (g & 31));
        this.dirty--;
      }
    });
  }

  /** Whether any granule of [offset, offset+length) is dirty. */
  isDirty(offset: number, length: number): boolean {
    let found = false;
    this.each(offset, length, (g) => { found ||= this.has(g); });
    return found;
  }

  /** Whether every granule of [offset, offset+length) is dirty. */
  isAllDirty(offset: number, length: number): boolean {
    let all = true;
    this.each(offset, length, (g) => { all &&= this.has(g); });
    return all;
  }

  /** The dirty runs inside [offset, offset+length) (granule-aligned, clipped to the device's end). */
  runsIn(offset: number, length: number): ByteRange[] {
    const out: ByteRange[] = [];
    const last = Math.min(this.granules, Math.ceil((offset + length) / this.granularity));
    for (let g = this.find(Math.floor(offset / this.granularity), last); g >= 0; g = this.find(g, last)) {
      const start = g;
      while (g < last && this.has(g)) g++;
      out.push({ offset: start * this.granularity, length: Math.min(g * this.granularity, this.sizeBytes) - start * this.granularity });
    }
    return out;
  }

  /**
   * The first dirty run from the granule holding `from` on (wrapping to the start), at most
   * `maxBytes` long and granule-aligned (clipped to the device's end); undefined when nothing is dirty.
   */
  next(from = 0, maxBytes = 16 * this.granularity): ByteRange | undefined {
    if (this.dirty === 0) return undefined;
    const start = from >= this.sizeBytes ? this.granules : Math.floor(from / this.granularity);
    let g = this.find(start, this.granules);
    if (g < 0) g = this.find(0, start);
    if (g < 0) return undefined;
    const most = Math.max(1, Math.floor(maxBytes / this.granularity));
    let end = g + 1;
    while (end < this.granules && end - g < most && this.has(end)) end++;
    const offset = g * this.granularity;
    return { offset, length: Math.min(end * this.granularity, this.sizeBytes) - offset };
  }

  /** Every dirty run, coalesced, in order. */
  ranges(): ByteRange[] {
    const out: ByteRange[] = [];
    for (let g = this.find(0, this.granules); g >= 0; g = this.find(g, this.granules)) {
      const start = g;
      while (g < this.granules && this.has(g)) g++;
      out.push({ offset: start * this.granularity, length: Math.min(g * this.granularity, this.sizeBytes) - start * this.granularity });
    }
    return out;
  }

  private has(g: number): boolean {
    return (this.bits[g >>> 5]! & (1 << (g & 31))) !== 0;
  }

  /** The first dirty granule in [from, to), or -1: whole clean words are skipped. */
  private find(from: number, to: number): number {
    for (let g = from; g < to;) {
      if ((g & 31) === 0 && this.bits[g >>> 5] === 0) {
        g += 32;
        continue;
      }
      if (this.has(g)) return g;
      g++;
    }
    return -1;
  }

  private each(offset: number, length: number, fn: (granule: number) => void): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.sizeBytes) {
      throw new InvalidArgument(`range ${offset}+${length} is outside the dirty map (${this.sizeBytes} bytes)`);
    }
    if (length === 0) return;
    const last = Math.floor((offset + length - 1) / this.granularity);
    for (let g = Math.floor(offset / this.granularity); g <= last; g++) fn(g);
  }
}
