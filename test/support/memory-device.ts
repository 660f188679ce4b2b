/** A sparse in-memory BlockDevice for the export's tests: 64 KiB chunks, holes where nothing was written. */
import { OutOfRange, type BlockDevice, type Extent } from '../../core/index.js';

const CHUNK = 64 * 1024;

export interface MemoryDevice extends BlockDevice {
  /** Flushes so far (a FUA write or FLUSH must reach the device). */
  readonly flushes: number;
  /** Chunks that hold data. */
  readonly allocated: number;
  /** Make the next calls of `op` fail with `error` (tests of error replies). */
  failNext(op: 'read' | 'write' | 'flush', error: Error): void;
}

export function memoryDevice(size: number, o: { blockSize?: number; depth?: boolean } = {}): MemoryDevice {
  const chunks = new Map<number, Uint8Array>();
  let flushes = 0;
  const failing = new Map<string, Error>();
  const check = (op: string, off: number, len: number) => {
    const e = failing.get(op);
    if (e) {
      failing.delete(op);
      throw e;
    }
    if (off < 0 || len < 0 || off + len > size) throw new OutOfRange(`${op} at ${off}+${len} is outside the device (${size} bytes)`);
  };
  const each = (off: number, len: number, fn: (i: number, within: number, n: number, at: number) => void) => {
    for (let p = off; p < off + len;) {
      const i = Math.floor(p / CHUNK);
      const within = p % CHUNK;
      const n = Math.min(CHUNK - within, off + len - p);
      fn(i, within, n, p - off);
      p += n;
    }
  };
  const zero = (off: number, len: number) => each(off, len, (i, within, n) => {
    if (n === CHUNK) chunks.delete(i);
    else chunks.get(i)?.fill(0, within, within + n);
  });
  const dev: MemoryDevice = {
    sizeBytes: size,
    blockSize: o.blockSize ?? CHUNK,
    get flushes() { return flushes; },
    get allocated() { return chunks.size; },
    failNext(op, error) { failing.set(op, error); },
    async read(off, len) {
      check('read', off, len);
      const out = new Uint8Array(len);
      each(off, len, (i, within, n, at) => {
        const c = chunks.get(i);
        if (c) out.set(c.subarray(within, within + n), at);
      });
      return out;
    },
    async write(off, data) {
      check('write', off, data.length);
      each(off, data.length, (i, within, n, at) => {
        let c = chunks.get(i);
        if (!c) chunks.set(i, (c = new Uint8Array(CHUNK)));
        c.set(data.subarray(at, at + n), within);
      });
    },
    async writeZeroes(off, len) {
      check('write', off, len);
      zero(off, len);
    },
    async discard(off, len) {
      check('write', off, len);
      zero(off, len);
    },
    async extents(off = 0, len = size - off) {
      check('read', off, len);
      const out: Extent[] = [];
      each(off, len, (i, within, n, at) => {
        if (!chunks.has(i)) return;
        const s = off + at;
        const last = out[out.length - 1];
        if (last && last.offset + last.length === s) last.length += n;
        else out.push({ offset: s, length: n, kind: 'data' });
      });
      return out;
    },
    async flush() {
      check('flush', 0, 0);
      flushes++;
    },
    async close() {},
  };
  if (o.depth) {
    // A two-layer view for qemu:allocation-depth: even chunks come from the top (1), odd ones from below (2).
    dev.allocationDepth = async (off, len) => {
      const out: { offset: number; length: number; depth: number }[] = [];
      each(off, len, (i, _w, n, at) => out.push({ offset: off + at, length: n, depth: chunks.has(i) ? (i % 2 === 0 ? 1 : 2) : 0 }));
      return out;
    };
  }
  return dev;
}
