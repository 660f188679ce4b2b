import { InvalidArgument } from '../../../core/index.js';
import type { DirtyMap } from './types.js';

/** A DirtyMap as a bit per `granularity` bytes, grown as writes land past its end. */
export class DirtyBitmap implements DirtyMap {
  private bits: Uint8Array;
  private wake: (() => void) | undefined;

  constructor(readonly granularity: number, size: number, private readonly onStop: (map: DirtyBitmap) => void) {
    if (!Number.isSafeInteger(granularity) || granularity < 512 || (granularity & (granularity - 1)) !== 0) {
      throw new InvalidArgument(`a dirty map's granularity is a power of two of at least 512 bytes, got ${granularity}`);
    }
    this.bits = new Uint8Array(Math.ceil(size / granularity / 8) + 1);
  }

  mark(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.granularity);
    const last = Math.floor((offset + length - 1) / this.granularity);
    if (last >> 3 >= this.bits.length) {
      const grown = new Uint8Array((last >> 3) + 1);
      grown.set(this.bits);
      this.bits = grown;
    }
    for (let b = first; b <= last; b++) this.bits[b >> 3]! |= 1 << (b & 7);
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  takeAll(maxBytes: number): { start: number; end: number }[] {
    const out: { start: number; end: number }[] = [];
    const maxBits = Math.max(1, Math.floor(maxBytes / this.granularity));
    const bits = this.bits;
    for (let i = 0; i < bits.length; i++) {
      if (bits[i] === 0) continue;
      for (let b = i * 8; b < i * 8 + 8; b++) {
        if (!(bits[b >> 3]! & (1 << (b & 7)))) continue;
        bits[b >> 3]! &= ~(1 << (b & 7));
        const last = out[out.length - 1];
        const start = b * this.granularity;
        if (last && last.end === start && (last.end - last.start) / this.granularity < maxBits) last.end = start + this.granularity;
        else out.push({ start, end: start + this.granularity });
      }
    }
    return out;
  }

  empty(): boolean {
    return this.bits.every((x) => x === 0);
  }

  changed(): Promise<void> {
    return new Promise((r) => {
      const prev = this.wake;
      this.wake = () => { prev?.(); r(); };
    });
  }

  stop(): void {
    this.onStop(this);
  }
}
