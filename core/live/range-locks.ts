import { KeyedMutex } from '../keyed-mutex.js';

/**
 * Exclusive locks on granule-aligned byte ranges, waited for in arrival order per granule: a live
 * copy holds one while it reads a range from the source and writes it to the target, and a
 * write-blocking guest write while it writes both sides, so that neither can interleave with the
 * other and leave the target older than the source (QEMU's mirror waits for overlapping in-flight
 * operations the same way: mirror_wait_on_conflicts).
 */
export class RangeLocks {
  private readonly mutex = new KeyedMutex();

  constructor(private readonly granularity: number) {}

  /** Run `fn` holding every granule that [offset, offset+length) touches. */
  run<T>(offset: number, length: number, fn: () => Promise<T>): Promise<T> {
    const first = Math.floor(offset / this.granularity);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / this.granularity);
    const keys: string[] = [];
    for (let g = first; g <= last; g++) keys.push(String(g));
    return this.mutex.run(keys, fn);
  }
}
