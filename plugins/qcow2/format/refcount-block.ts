/**
 * Refcount blocks hold entries of refcount_bits = 1 << order bits (1–64). Sub-byte widths are
 * packed LSB first; wider ones are big-endian. Values are numbers (exact below 2^53).
 */
import { Buffer } from 'node:buffer';
import { getU64, setU64, view } from './bytes.js';

export function entriesPerBlock(clusterSize: number, order: number): number {
  return (clusterSize * 8) >> order;
}

export function maxRefcount(order: number): number {
  return order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
}

export function getRefcount(block: Uint8Array, index: number, order: number): number {
  switch (order) {
    case 0: case 1: case 2: {
      const bits = 1 << order;
      const bitPos = index * bits;
      return (block[bitPos >> 3]! >> (bitPos & 7)) & ((1 << bits) - 1);
    }
    case 3: return block[index]!;
    // 16 and 32 bits by hand: a DataView per entry was most of an allocation-heavy convert's CPU.
    case 4: return (block[index * 2]! << 8) | block[index * 2 + 1]!;
    case 5: return block[index * 4]! * 0x100_0000 + ((block[index * 4 + 1]! << 16) | (block[index * 4 + 2]! << 8) | block[index * 4 + 3]!);
    default: return getU64(view(block), index * 8);
  }
}

export function setRefcount(block: Uint8Array, index: number, order: number, value: number): void {
  switch (order) {
    case 0: case 1: case 2: {
      const bits = 1 << order;
      const bitPos = index * bits;
      const mask = ((1 << bits) - 1) << (bitPos & 7);
      const i = bitPos >> 3;
      block[i] = (block[i]! & ~mask) | ((value << (bitPos & 7)) & mask);
      return;
    }
    case 3: block[index] = value; return;
    case 4:
      block[index * 2] = value >>> 8;
      block[index * 2 + 1] = value;
      return;
    case 5:
      block[index * 4] = value >>> 24;
      block[index * 4 + 1] = value >>> 16;
      block[index * 4 + 2] = value >>> 8;
      block[index * 4 + 3] = value;
      return;
    default: setU64(view(block), index * 8, value);
  }
}

/**
 * Entries [from, to) of a block as whole bytes [a, b), and the entries before and after them
 * that share a byte with other entries (sub-byte widths): [from, headEnd) and [tailStart, to).
 */
function byteSpan(from: number, to: number, order: number): { headEnd: number; a: number; b: number; tailStart: number } {
  const perByte = order >= 3 ? 1 : 8 >> order;
  const headEnd = Math.min(to, Math.ceil(from / perByte) * perByte);
  const tailStart = Math.max(headEnd, Math.floor(to / perByte) * perByte);
  const bytes = (i: number) => (order >= 3 ? i << (order - 3) : i / perByte);
  return { headEnd, a: bytes(headEnd), b: bytes(tailStart), tailStart };
}

/**
 * Whether entries [from, to) are all zero: the whole bytes in one native compare, not one call
 * per entry (claiming the clusters a 512 MiB copy wrote checks 8192 entries).
 */
export function refcountsAllZero(block: Uint8Array, from: number, to: number, order: number): boolean {
  const { headEnd, a, b, tailStart } = byteSpan(from, to, order);
  for (let i = from; i < headEnd; i++) if (getRefcount(block, i, order) !== 0) return false;
  for (let i = tailStart; i < to; i++) if (getRefcount(block, i, order) !== 0) return false;
  return a >= b || Buffer.compare(block.subarray(a, b), zeroBytes(b - a)) === 0;
}

/** Set entries [from, to) to `value`: the whole bytes by doubling copies, not one call per entry. */
export function fillRefcounts(block: Uint8Array, from: number, to: number, order: number, value: number): void {
  const { headEnd, a, b, tailStart } = byteSpan(from, to, order);
  for (let i = from; i < headEnd; i++) setRefcount(block, i, order, value);
  for (let i = tailStart; i < to; i++) setRefcount(block, i, order, value);
  if (a >= b) return;
  // One byte (sub-byte widths) or one entry (wider) holds the pattern; copies double it.
  const unit = order >= 3 ? 1 << (order - 3) : 1;
  if (order >= 3) setRefcount(block, a / unit, order, value);
  else for (let i = 0; i < 8 >> order; i++) setRefcount(block, a * (8 >> order) + i, order, value);
  for (let filled = unit; filled < b - a; filled *= 2) block.copyWithin(a + filled, a, a + Math.min(filled, b - a - filled));
}

let zeros = new Uint8Array(0);
function zeroBytes(n: number): Uint8Array {
  if (zeros.length < n) zeros = new Uint8Array(n);
  return zeros.subarray(0, n);
}

/** The byte range of a block that holds entry `index` (for writing just that part back). */
export function entryByteRange(index: number, order: number): [number, number] {
  const start = (index << order) >> 3;
  return [start, start + Math.max(1, (1 << order) >> 3)];
}

/** Refcount table entries: bits 9–63 are the block offset (0 = no block). */
export function reftableEntry(table: Uint8Array, index: number): number {
  const dv = view(table);
  const hi = dv.getUint32(index * 8);
  const lo = dv.getUint32(index * 8 + 4);
  return hi * 0x1_0000_0000 + ((lo & 0xffff_fe00) >>> 0);
}

/** The raw low bits 0–8 of a refcount table entry (reserved; should be zero). */
export function reftableReserved(table: Uint8Array, index: number): number {
  return view(table).getUint32(index * 8 + 4) & 0x1ff;
}
