/**
 * Refcount blocks hold entries of refcount_bits = 1 << order bits (1–64). Sub-byte widths are
 * packed LSB first; wider ones are big-endian. Values are numbers (exact below 2^53).
 */
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
