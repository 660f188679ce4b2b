/**
 * Exclusive locks on granule-aligned byte ranges, waited for in arrival order per granule: a live
 * copy holds one while it reads a range from the source and writes it to the target, and a
 * write-blocking guest write while it writes both sides, so that neither can interleave with the
 * other and leave the target older than the source (QEMU's mirror waits for overlapping in-flight
 * operations the same way: mirror_wait_on_conflicts).
 */
export class RangeLocks {
  private readonly tails = new Map<number, Promise<void>>();

  constructor(private readonly granularity: number) {}

  /** Lock every granule that [offset, offset+length) touches, in order; resolves with the release. */
  async lock(offset: number, length: number): Promise<() => void> {
    const first = Math.floor(offset / this.granularity);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / this.granularity);
    const releases: (() => void)[] = [];
    for (let g = first; g <= last; g++) {
      const prev = this.tails.get(g) ?? Promise.resolve();
      let release!: () => void;
      const mine = new Promise<void>((r) => (release = r));
      const tail = prev.then(() => mine);
      this.tails.set(g, tail);
      await prev;
      releases.push(() => {
        release();
        if (this.tails.get(g) === tail) this.tails.delete(g);
      });
    }
    let done = false;
    return () => {
      if (done) return;
      done = true;
      for (const r of releases.reverse()) r();
    };
  }
}
