import { Buffer } from 'node:buffer';

/**
 * L1 and L2 table entries. An entry is a big-endian u64; we keep it as two u32 halves so the
 * common paths stay in plain number arithmetic (offsets use bits 9–55).
 */

export const COPIED_HI = 0x8000_0000;
export const COMPRESSED_HI = 0x4000_0000;
export const ZERO_LO = 1;

export type L2Kind = 'unallocated' | 'zero' | 'normal' | 'compressed';

export interface L2Entry {
  kind: L2Kind;
  /** Host offset of the data cluster (normal, or zero with a preallocated cluster); 0 if none. */
  offset: number;
  copied: boolean;
  /** Compressed: byte offset of the compressed data and its stored length in bytes. */
  compressedOffset?: number;
  compressedBytes?: number;
  /** Bits that must be zero but are not (reserved bits set). */
  reserved: boolean;
}

function offsetOf(hi: number, lo: number): number {
  return (hi & 0x00ff_ffff) * 0x1_0000_0000 + ((lo & 0xffff_fe00) >>> 0);
}

/** Big-endian u32 at byte `o` (by hand: this runs once per cluster on every lookup). */
function u32(t: Uint8Array, o: number): number {
  return ((t[o]! << 24) | (t[o + 1]! << 16) | (t[o + 2]! << 8) | t[o + 3]!) >>> 0;
}

export function readEntry(table: Uint8Array, index: number): [number, number] {
  return [u32(table, index * 8), u32(table, index * 8 + 4)];
}

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const SWAP_FROM = 64;

/**
 * Entries [i0, i1) of an L1/L2 table as host-order u32 halves, `[lo, hi]` per entry, in one
 * native byte swap (Buffer.swap64): a loop over a large range then reads plain typed-array
 * elements instead of assembling each entry from bytes. Unsigned, as readEntry's halves.
 */
export function entryWords(table: Uint8Array, i0: number, i1: number): Uint32Array {
  const words = new Uint32Array((i1 - i0) * 2);
  // A Buffer over the words costs more than a few entries by hand (lookups of single clusters).
  if (LITTLE_ENDIAN && i1 - i0 >= SWAP_FROM) {
    const bytes = Buffer.from(words.buffer);
    bytes.set(table.subarray(i0 * 8, i1 * 8));
    bytes.swap64();
  } else {
    for (let i = i0; i < i1; i++) {
      words[(i - i0) * 2] = u32(table, i * 8 + 4);
      words[(i - i0) * 2 + 1] = u32(table, i * 8);
    }
  }
  return words;
}

export function writeEntry(table: Uint8Array, index: number, hi: number, lo: number): void {
  const o = index * 8;
  table[o] = hi >>> 24; table[o + 1] = hi >>> 16; table[o + 2] = hi >>> 8; table[o + 3] = hi;
  table[o + 4] = lo >>> 24; table[o + 5] = lo >>> 16; table[o + 6] = lo >>> 8; table[o + 7] = lo;
}

export interface L1Entry {
  l2Offset: number;
  copied: boolean;
  /** Bits 1–8 or 56–62 set (QEMU ignores 1–8 but they should be zero). */
  reserved: boolean;
}

export function decodeL1(hi: number, lo: number): L1Entry {
  return { l2Offset: offsetOf(hi, lo), copied: (hi & COPIED_HI) !== 0, reserved: (hi & 0x7f00_0000) !== 0 || (lo & 0x1fe) !== 0 };
}

/** Whether an L1 entry's L2 offset is not cluster-aligned (a corruption). */
export function l1Unaligned(hi: number, lo: number, clusterSize: number): boolean {
  return offsetOf(hi, lo) % clusterSize !== 0;
}

export function encodeL1(l2Offset: number, copied: boolean): [number, number] {
  return [(Math.floor(l2Offset / 0x1_0000_0000) | (copied ? COPIED_HI : 0)) >>> 0, l2Offset >>> 0];
}

export function decodeL2(hi: number, lo: number, clusterBits: number): L2Entry {
  if (hi & COMPRESSED_HI) {
    // x = 62 - (cluster_bits - 8): bits 0..x-1 host byte offset, x..61 extra 512-byte sectors.
    const x = 62 - (clusterBits - 8);
    const v = (BigInt(hi) << 32n) | BigInt(lo >>> 0);
    const compressedOffset = Number(v & ((1n << BigInt(x)) - 1n));
    const sectors = Number((v >> BigInt(x)) & ((1n << BigInt(62 - x)) - 1n)) + 1;
    const compressedBytes = sectors * 512 - (compressedOffset % 512);
    return {
      kind: 'compressed', offset: 0, copied: (hi & COPIED_HI) !== 0, compressedOffset, compressedBytes, reserved: false,
    };
  }
  const offset = offsetOf(hi, lo);
  const zero = (lo & ZERO_LO) !== 0;
  const reserved = (hi & 0x3f00_0000) !== 0 || (lo & 0x1fe) !== 0;
  const copied = (hi & COPIED_HI) !== 0;
  if (zero) return { kind: 'zero', offset, copied, reserved };
  if (offset === 0) return { kind: 'unallocated', offset: 0, copied, reserved };
  return { kind: 'normal', offset, copied, reserved };
}

export function encodeL2Normal(offset: number, copied: boolean): [number, number] {
  return encodeL1(offset, copied);
}

export function encodeL2Zero(offset = 0, copied = false): [number, number] {
  const [hi, lo] = encodeL1(offset, copied);
  return [hi, (lo | ZERO_LO) >>> 0];
}

export function encodeL2Compressed(hostOffset: number, bytes: number, clusterBits: number): [number, number] {
  const x = 62 - (clusterBits - 8);
  const sectors = Math.ceil((hostOffset % 512 + bytes) / 512) - 1;
  const v = (1n << 62n) | (BigInt(sectors) << BigInt(x)) | BigInt(hostOffset);
  return [Number(v >> 32n) >>> 0, Number(v & 0xffff_ffffn) >>> 0];
}
