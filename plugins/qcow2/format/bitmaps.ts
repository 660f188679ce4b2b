import { getU64, setU64, view } from './bytes.js';

/**
 * Persistent dirty bitmaps (docs/interop/qcow2.rst, "Bitmaps extension"): the header extension
 * 0x23852875 points at a directory of entries; each entry points at a bitmap table with one u64
 * per cluster of bitmap data. Pure codecs, no I/O.
 */

/** QEMU's limits (block/qcow2-bitmap.c). */
export const BITMAP_LIMITS = {
  maxBitmaps: 65535,
  maxNameSize: 1023,
  minGranularityBits: 9,
  maxGranularityBits: 31,
  maxDirectorySize: 64 * 1024 * 1024,
  /** BME_MAX_TABLE_SIZE: entries of one bitmap table. */
  maxTableSize: 0x8000000,
  /** BME_MAX_PHYS_SIZE: bytes of one bitmap's data. */
  maxPhysSize: 0x20000000,
} as const;

export const BME_FLAG_IN_USE = 1 << 0;
export const BME_FLAG_AUTO = 1 << 1;
export const BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2;
const BME_RESERVED_FLAGS = ~(BME_FLAG_IN_USE | BME_FLAG_AUTO | BME_FLAG_EXTRA_DATA_COMPATIBLE) >>> 0;
export const BT_DIRTY_TRACKING = 1;

/** Table entry: bits 9–55 the data cluster's offset; with offset 0, bit 0 = all ones. */
const TABLE_OFFSET_MASK_HI = 0x00ff_ffff;
const TABLE_OFFSET_MASK_LO = 0xffff_fe00;
export const TABLE_ALL_ONES = 1;

export interface BitmapsExtension {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

export function decodeBitmapsExtension(data: Uint8Array): BitmapsExtension | string {
  if (data.length < 24) return `bitmaps extension of ${data.length} bytes (24 expected)`;
  const dv = view(data);
  if (dv.getUint32(4) !== 0) return 'bitmaps extension reserved field is not zero';
  return { nbBitmaps: dv.getUint32(0), directorySize: getU64(dv, 8), directoryOffset: getU64(dv, 16) };
}

export function encodeBitmapsExtension(e: BitmapsExtension): Uint8Array {
  const out = new Uint8Array(24);
  const dv = view(out);
  dv.setUint32(0, e.nbBitmaps);
  setU64(dv, 8, e.directorySize);
  setU64(dv, 16, e.directoryOffset);
  return out;
}

export interface BitmapDirEntry {
  tableOffset: number;
  tableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  name: string;
  /** Extra data, kept as found (QEMU writes none). */
  extra: Uint8Array;
}

/** Bytes of an entry: 24, extra data, name, padded to 8. */
export function dirEntrySize(nameBytes: number, extraBytes: number): number {
  return Math.ceil((24 + extraBytes + nameBytes) / 8) * 8;
}

/** Decode `count` entries; a structural fault is a message (the caller makes it Corrupt). */
export function decodeBitmapDirectory(dir: Uint8Array, count: number): BitmapDirEntry[] | string {
  const dv = view(dir);
  const out: BitmapDirEntry[] = [];
  let off = 0;
  for (let i = 0; i < count; i++) {
    if (off + 24 > dir.length) return `bitmap directory entry ${i} lies past the directory's end`;
    const nameSize = dv.getUint16(off + 18);
    const extraSize = dv.getUint32(off + 20);
    const size = dirEntrySize(nameSize, extraSize);
    if (off + size > dir.length) return `bitmap directory entry ${i} lies past the directory's end`;
    const e: BitmapDirEntry = {
      tableOffset: getU64(dv, off),
      tableSize: dv.getUint32(off + 8),
      flags: dv.getUint32(off + 12),
      type: dir[off + 16]!,
      granularityBits: dir[off + 17]!,
      extra: dir.slice(off + 24, off + 24 + extraSize),
      name: new TextDecoder().decode(dir.subarray(off + 24 + extraSize, off + 24 + extraSize + nameSize)),
    };
    const why = entryFault(e, nameSize);
    if (why) return `bitmap ${JSON.stringify(e.name)}: ${why}`;
    out.push(e);
    off += size;
  }
  if (off !== dir.length) return `bitmap directory size ${dir.length} does not match its ${count} entries (${off} bytes)`;
  return out;
}

function entryFault(e: BitmapDirEntry, nameSize: number): string | undefined {
  if (nameSize === 0 || nameSize > BITMAP_LIMITS.maxNameSize) return `name size ${nameSize} outside 1..${BITMAP_LIMITS.maxNameSize}`;
  if (e.type !== BT_DIRTY_TRACKING) return `type ${e.type} is not a dirty tracking bitmap`;
  if (e.granularityBits < BITMAP_LIMITS.minGranularityBits || e.granularityBits > BITMAP_LIMITS.maxGranularityBits) {
    return `granularity bits ${e.granularityBits} outside ${BITMAP_LIMITS.minGranularityBits}..${BITMAP_LIMITS.maxGranularityBits}`;
  }
  if (e.flags & BME_RESERVED_FLAGS) return `reserved flags 0x${(e.flags & BME_RESERVED_FLAGS).toString(16)} set`;
  if (e.extra.length > 0 && !(e.flags & BME_FLAG_EXTRA_DATA_COMPATIBLE)) return 'extra data that is not marked compatible';
  if (e.tableSize > BITMAP_LIMITS.maxTableSize) return `table size ${e.tableSize} too large`;
  if (e.tableOffset % 512 !== 0) return 'table offset is not aligned';
  return undefined;
}

export function encodeBitmapDirectory(entries: readonly BitmapDirEntry[]): Uint8Array {
  const enc = new TextEncoder();
  const names = entries.map((e) => enc.encode(e.name));
  const total = entries.reduce((n, e, i) => n + dirEntrySize(names[i]!.length, e.extra.length), 0);
  const out = new Uint8Array(total);
  const dv = view(out);
  let off = 0;
  entries.forEach((e, i) => {
    const name = names[i]!;
    setU64(dv, off, e.tableOffset);
    dv.setUint32(off + 8, e.tableSize);
    dv.setUint32(off + 12, e.flags);
    out[off + 16] = e.type;
    out[off + 17] = e.granularityBits;
    dv.setUint16(off + 18, name.length);
    dv.setUint32(off + 20, e.extra.length);
    out.set(e.extra, off + 24);
    out.set(name, off + 24 + e.extra.length);
    off += dirEntrySize(name.length, e.extra.length);
  });
  return out;
}

/** One bitmap table entry: a data cluster's offset, or (offset 0) all zeros / all ones. */
export function decodeTableEntry(table: Uint8Array, i: number): { offset: number; allOnes: boolean; reserved: boolean } {
  const dv = view(table);
  const hi = dv.getUint32(i * 8);
  const lo = dv.getUint32(i * 8 + 4);
  const offset = (hi & TABLE_OFFSET_MASK_HI) * 0x1_0000_0000 + ((lo & TABLE_OFFSET_MASK_LO) >>> 0);
  const reserved = (hi & ~TABLE_OFFSET_MASK_HI) !== 0 || (lo & 0x1fe) !== 0 || (offset !== 0 && (lo & 1) !== 0);
  return { offset, allOnes: offset === 0 && (lo & 1) === 1, reserved };
}

export function encodeTableEntry(table: Uint8Array, i: number, offset: number): void {
  setU64(view(table), i * 8, offset);
}

/** Bytes of bitmap data for a disk of `size` bytes at granularity 2^bits: one bit per unit. */
export function bitmapDataBytes(size: number, granularityBits: number): number {
  return Math.ceil(Math.ceil(size / 2 ** granularityBits) / 8);
}
