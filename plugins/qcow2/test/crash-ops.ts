/**
 * The deterministic op sequence of the crash test, shared by the writer child process and the
 * checking parent: allocation, copy-on-write of partial clusters, zero writes, discards,
 * refcount-table growth (512-byte clusters, 64-bit refcounts), L1 growth (resize) and
 * snapshot create/delete.
 */
export const CRASH_CS = 512;
export const CRASH_SIZE = 4 << 20;
export const CRASH_GROWN = 8 << 20;

export type CrashOp =
  | { kind: 'write'; off: number; len: number; byte: number }
  | { kind: 'zero' | 'discard'; off: number; len: number }
  | { kind: 'resize'; size: number }
  | { kind: 'snapshot-create' | 'snapshot-delete'; name: string };

export function crashOps(seed: number): CrashOp[] {
  let s = seed >>> 0 || 1;
  const r = () => { s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0; return s / 0x1_0000_0000; };
  const ops: CrashOp[] = [];
  let size = CRASH_SIZE;
  for (let k = 0; k < 70; k++) {
    if (k === 15) { ops.push({ kind: 'snapshot-create', name: 'a' }); continue; }
    if (k === 30) { ops.push({ kind: 'resize', size: CRASH_GROWN }); size = CRASH_GROWN; continue; }
    if (k === 45) { ops.push({ kind: 'snapshot-delete', name: 'a' }); continue; }
    const x = r();
    const clusters = 1 + Math.floor(r() * 400);
    const off = Math.floor(r() * (size / CRASH_CS - clusters)) * CRASH_CS;
    const len = clusters * CRASH_CS;
    if (x < 0.6) ops.push({ kind: 'write', off, len, byte: 1 + (k % 250) });
    else if (x < 0.75) ops.push({ kind: 'write', off: off + 100, len: 300, byte: 1 + (k % 250) });
    else if (x < 0.9) ops.push({ kind: 'zero', off, len });
    else ops.push({ kind: 'discard', off, len });
  }
  return ops;
}

/** The guest content after ops[0..n) on top of `initial`. */
export function stateAfter(initial: Uint8Array, ops: CrashOp[], n: number): Uint8Array {
  let d = new Uint8Array(CRASH_SIZE);
  d.set(initial.subarray(0, CRASH_SIZE));
  for (const o of ops.slice(0, n)) {
    if (o.kind === 'write') d.fill(o.byte, o.off, o.off + o.len);
    else if (o.kind === 'zero' || o.kind === 'discard') d.fill(0, o.off, o.off + o.len);
    else if (o.kind === 'resize') {
      const g = new Uint8Array(o.size);
      g.set(d);
      d = g;
    }
  }
  return d;
}
