/**
 * Buffers for READ replies, used again once the socket has written them. A fresh buffer per READ
 * (nbdcopy: 2048 of 256 KiB per 512 MiB) left the freeing to V8's garbage collector, which runs
 * when enough external memory has piled up: a server's RSS rose ~130 MiB above what its budget
 * held, and every new buffer's pages were faulted in (and zeroed by the kernel) again.
 *
 * Sizes come in classes a quarter of a power of two apart (64 KiB, 80 KiB, 96 KiB, 112 KiB,
 * 128 KiB, 160 KiB …), so a buffer fits requests up to 25 % smaller than it. A returned buffer is
 * kept while the pool's buffers, in use and free, stay within `limit` bytes; past that, idle
 * buffers of other sizes are dropped for the collector first, then the one returned. Requests below the smallest class get a buffer of their own.
 */
export class BufferPool {
  private readonly free = new Map<number, ArrayBuffer[]>();
  private readonly mine = new WeakSet<ArrayBuffer>();
  /** Bytes of the pool's buffers, free or in use (by class size). */
  private held = 0;

  constructor(private readonly limit: number) {}

  /** A buffer of exactly n bytes (contents unspecified); hand it back with give() once written. */
  take(n: number): Buffer {
    if (n < MIN_CLASS) return Buffer.allocUnsafe(n);
    const size = classOf(n);
    let ab = this.free.get(size)?.pop();
    if (!ab) {
      ab = new ArrayBuffer(size + SKEW);
      this.mine.add(ab);
      this.held += size;
    }
    return Buffer.from(ab, SKEW, n);
  }

  /** A buffer from take() is free again (the socket has written it, or it was never sent). */
  give(buf: Buffer): void {
    const ab = buf.buffer as ArrayBuffer;
    if (!this.mine.has(ab)) return;
    const size = ab.byteLength - SKEW;
    // Over the limit (requests of another size came along): idle buffers of other sizes go first,
    // then this one. Dropped buffers are the collector's.
    if (this.held > this.limit) this.evictOtherThan(size);
    if (this.held > this.limit) {
      this.held -= size;
      return;
    }
    const list = this.free.get(size);
    if (list) list.push(ab);
    else this.free.set(size, [ab]);
  }

  private evictOtherThan(keep: number): void {
    for (const [size, list] of this.free) {
      if (size === keep) continue;
      while (list.length > 0 && this.held > this.limit) {
        list.pop();
        this.held -= size;
      }
      if (list.length === 0) this.free.delete(size);
      if (this.held <= this.limit) return;
    }
  }
}

const MIN_CLASS = 64 * 1024;

/**
 * Where a buffer's bytes start in its ArrayBuffer. The qcow2 engine measured a kernel copy from
 * the page cache into a page-aligned buffer running several times slower on AMD Zen CPUs (see
 * IO_SKEW in plugins/qcow2/format/bytes.ts); the same offset keeps these buffers off the page
 * boundary.
 */
const SKEW = 2048;

/** The smallest class ≥ n: 2^k × (1, 1.25, 1.5, 1.75). */
function classOf(n: number): number {
  if (n <= MIN_CLASS) return MIN_CLASS;
  const p = 2 ** Math.floor(Math.log2(n - 1));
  const step = p / 4;
  return Math.ceil(n / step) * step;
}
