/**
 * A BlockDevice with a volatile write cache, as a disk or a host's page cache has: a write is seen
 * by every read at once, but only a flush that began after it ended makes it durable.
 * `powerLoss()` is what the device would hold if the power went now (taken synchronously, so
 * that a test can take it at one instant with other state).
 */
import type { BlockDevice } from '../../core/index.js';
import { memoryDevice } from './memory-device.js';

export interface VolatileDevice extends BlockDevice {
  /** Its contents after a power loss now: what the flushes that completed made durable. */
  powerLoss(): Uint8Array;
}

export function volatileDevice(size: number): VolatileDevice {
  const seen = memoryDevice(size);
  const durable = new Uint8Array(size);
  /** Writes not flushed yet, in order (a zeroing is a write of zeros). */
  let pending: { offset: number; data: Uint8Array }[] = [];
  return {
    sizeBytes: size,
    blockSize: seen.blockSize,
    read: (offset, length) => seen.read(offset, length),
    async write(offset, data) {
      await seen.write(offset, data);
      pending.push({ offset, data: data.slice() });
    },
    async writeZeroes(offset, length) {
      await seen.writeZeroes!(offset, length);
      pending.push({ offset, data: new Uint8Array(length) });
    },
    extents: (offset, length) => seen.extents(offset, length),
    async flush() {
      // What was written before the flush began; later writes wait for a later flush.
      const now = pending;
      pending = [];
      await new Promise((r) => setImmediate(r));
      for (const w of now) durable.set(w.data, w.offset);
    },
    powerLoss: () => durable.slice(),
    close: async () => undefined,
  };
}
