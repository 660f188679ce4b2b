/**
 * Speed limit in bytes/s (0 = unlimited). Each chunk books its transfer time on a timeline; the
 * caller waits until the timeline catches up, less one 100 ms slice of allowed burst (QEMU's
 * limiter also works in 100 ms slices).
 */
export const SLICE_MS = 100;

/** A speed limit on a timeline of 100 ms slices (see above). */
export class RateLimiter {
  private speed = 0;
  private nextFree = 0;

  constructor(private readonly now: () => number = () => Date.now()) {}

  setSpeed(bytesPerSecond: number): void {
    this.speed = Math.max(0, bytesPerSecond);
    this.nextFree = this.now();
  }

  /** Account `bytes` just moved; return how long (ms) to wait before moving more. */
  delayFor(bytes: number): number {
    if (this.speed <= 0 || bytes <= 0) return 0;
    const now = this.now();
    this.nextFree = Math.max(this.nextFree, now - SLICE_MS) + (bytes * 1000) / this.speed;
    return Math.max(0, this.nextFree - now - SLICE_MS);
  }
}
