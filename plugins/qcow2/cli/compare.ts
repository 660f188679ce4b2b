/**
 * `qemu-img compare [-f fmt] [-F fmt] file1 file2`: "Images are identical." (exit 0) or
 * "Content mismatch at offset N!" (exit 1), N the first differing 512-byte sector as qemu-img 7.2
 * reports it. Unallocated reads as zero; of images of different sizes the extra part of the
 * larger must be zero. Ranges both images report as zero are not read.
 */
import { imageDevice, openImage, type Image, type ImageFormat } from '../engine/index.js';
import type { ImgOutput } from './output.js';

export interface CompareArgs {
  file1: string;
  file2: string;
  format1?: ImageFormat;
  format2?: ImageFormat;
}

const SECTOR = 512;
const CHUNK = 4 * 1024 * 1024;

export const EXIT_DIFFERENT = 1;
export const EXIT_COMPARE_ERROR = 2;

export async function runCompare(args: CompareArgs, out: ImgOutput): Promise<void> {
  let a: Image | undefined;
  let b: Image | undefined;
  try {
    try {
      a = await openImage(args.file1, { readOnly: true, ...(args.format1 ? { format: args.format1 } : {}) });
      b = await openImage(args.file2, { readOnly: true, ...(args.format2 ? { format: args.format2 } : {}) });
    } catch (e) {
      // qemu-img compare: 2 when an image cannot be opened (1 means "different").
      out.warn((e as Error).message);
      out.setExitCode(EXIT_COMPARE_ERROR);
      return;
    }
    const lines: string[] = [];
    if (a.virtualSize !== b.virtualSize) lines.push('Warning: Image size mismatch!');
    const mismatch = await firstMismatch(a, b);
    if (mismatch === undefined) {
      lines.push('Images are identical.');
      out.print({ identical: true }, lines.join('\n'));
    } else {
      lines.push(`Content mismatch at offset ${mismatch}!`);
      out.print({ identical: false, offset: mismatch }, lines.join('\n'));
      out.setExitCode(EXIT_DIFFERENT);
    }
  } finally {
    await a?.close();
    await b?.close();
  }
}

/** The sector-aligned offset of the first difference, or undefined when the contents are equal. */
export async function firstMismatch(a: Image, b: Image): Promise<number | undefined> {
  const common = Math.min(a.virtualSize, b.virtualSize);
  const zeroA = await zeroRanges(a);
  const zeroB = await zeroRanges(b);
  let pos = 0;
  while (pos < common) {
    // Skip what both report as zeroes without reading it.
    const skip = Math.min(zeroEnd(zeroA, pos), zeroEnd(zeroB, pos));
    if (skip > pos) {
      pos = Math.min(skip, common);
      continue;
    }
    const n = Math.min(CHUNK, common - pos);
    const [da, db] = await Promise.all([a.read(pos, n), b.read(pos, n)]);
    const i = diffIndex(da, db);
    if (i >= 0) return alignDown(pos + i);
    pos += n;
  }
  // The tail of the larger image must read as zeroes.
  const larger = a.virtualSize > b.virtualSize ? a : b;
  const zeroL = larger === a ? zeroA : zeroB;
  while (pos < larger.virtualSize) {
    const skip = zeroEnd(zeroL, pos);
    if (skip > pos) {
      pos = skip;
      continue;
    }
    const n = Math.min(CHUNK, larger.virtualSize - pos);
    const d = await larger.read(pos, n);
    const i = d.findIndex((x) => x !== 0);
    if (i >= 0) return alignDown(pos + i);
    pos += n;
  }
  return undefined;
}

function alignDown(offset: number): number {
  return offset - (offset % SECTOR);
}

function diffIndex(a: Uint8Array, b: Uint8Array): number {
  if (Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength))) return -1;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

/**
 * Sorted [start, end) ranges that read as zero: everywhere the image's data extents are not (the
 * extents a copy of it would use: cheap for raw files, whose holes are not guessed by reading).
 */
async function zeroRanges(img: Image): Promise<[number, number][]> {
  const data = (await (await imageDevice(img, { mode: 'r' })).extents()).filter((e) => e.kind === 'data');
  const out: [number, number][] = [];
  let p = 0;
  for (const e of data) {
    if (e.offset > p) out.push([p, e.offset]);
    p = e.offset + e.length;
  }
  if (p < img.virtualSize) out.push([p, img.virtualSize]);
  return out;
}

/** End of the zero range containing `pos`, or `pos` when `pos` is not in one. */
function zeroEnd(ranges: readonly [number, number][], pos: number): number {
  let lo = 0;
  let hi = ranges.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const [s, e] = ranges[mid]!;
    if (pos < s) hi = mid - 1;
    else if (pos >= e) lo = mid + 1;
    else return e;
  }
  return pos;
}
