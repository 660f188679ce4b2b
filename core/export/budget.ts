/**
 * Bytes of request payloads a server holds at once, across its connections: a request waits for
 * its share before its payload is read (or its data is read from the device). One request larger
 * than the whole budget still goes through, alone.
 */
export class Budget {
  private used = 0;
  private readonly waiters: { n: number; wake: () => void }[] = [];

  constructor(readonly capacity: number) {}

  async acquire(n: number): Promise<void> {
    if (n <= 0) return;
    if (this.waiters.length === 0 && (this.used + n <= this.capacity || this.used === 0)) {
      this.used += n;
      return;
    }
    await new Promise<void>((wake) => this.waiters.push({ n, wake }));
  }

  release(n: number): void {
    if (n <= 0) return;
    this.used -= n;
    while (this.waiters.length > 0) {
      const w = this.waiters[0]!;
      if (this.used + w.n > this.capacity && this.used !== 0) break;
      this.waiters.shift();
      this.used += w.n;
      w.wake();
    }
  }
}
