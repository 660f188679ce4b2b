/**
 * `qemu-img compare [-f fmt] [-F fmt] [-s] file1 file2`: "Images are identical." (exit 0) or
 * "Content mismatch at offset N!" (exit 1; 2 when an image cannot be opened, 4 when one cannot be
 * read, as qemu-img), N the first differing 512-byte sector as qemu-img 7.2
 * reports it. Unallocated reads as zero; of images of different sizes the extra part of the
 * larger must be zero. Ranges both images report as zero are not read. Strict (`-s`): the sizes
 * must be equal and so must the block status of every range (see statusWord).
 */
import { imageDevice, openImage, type BlockStatus, type Image, type ImageFormat } from '../engine/index.js';
import { mapEntries, type MapEntry } from './map.js';
import type { ImgOutput } from './output.js';

export interface CompareArgs {
  file1: string;
  file2: string;
  format1?: ImageFormat;
  format2?: ImageFormat;
  /** `-s`: different sizes, or a range allocated (or zero, or compressed…) in one and not so in the other, is a difference. */
  strict?: boolean;
}

const SECTOR = 512;
const CHUNK = 4 * 1024 * 1024;

export const EXIT_DIFFERENT = 1;
export const EXIT_COMPARE_ERROR = 2;
/** qemu-img compare's 4: an image could not be read (a damaged cluster, an I/O error) — not "different". */
export const EXIT_READ_ERROR = 4;

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
    if (a.virtualSize !== b.virtualSize) {
      if (args.strict) {
        out.print({ identical: false, mismatch: 'size' }, 'Strict mode: Image size mismatch!');
        out.setExitCode(EXIT_DIFFERENT);
        return;
      }
      lines.push('Warning: Image size mismatch!');
    }
    let mismatch: number | undefined;
    let statusAt: number | undefined;
    try {
      mismatch = await firstMismatch(a, b);
      // qemu-img steps through both images' block status, comparing it before the data of each step.
      statusAt = args.strict ? await firstStatusMismatch(a, b) : undefined;
    } catch (e) {
      out.warn(`${(e as { code?: string }).code ? `${(e as { code: string }).code}: ` : ''}${(e as Error).message}`);
      out.setExitCode(EXIT_READ_ERROR);
      return;
    }
    if (statusAt !== undefined && (mismatch === undefined || statusAt <= mismatch)) {
      out.print({ identical: false, offset: statusAt, mismatch: 'block status' }, `Strict mode: Offset ${statusAt} block status mismatch!`);
      out.setExitCode(EXIT_DIFFERENT);
    } else if (mismatch === undefined) {
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

/**
 * Where the block status of two images of one size first differs, as qemu-img's strict mode sees
 * it: it asks each image for the status of the rest of it from an offset, compares the flag words
 * (allocated, zero, data, offset valid, compressed, and EOF: the answer runs to the end), and
 * steps by the shorter answer. A qcow2 image answers at most to the end of an L2 table (so one
 * whose data crosses one differs from a raw copy: its first answer does not reach the end), and
 * status found in a backing file carries no EOF.
 */
export async function firstStatusMismatch(a: Image, b: Image): Promise<number | undefined> {
  const size = a.virtualSize;
  const ra = statusRuns(a, await a.blockStatus());
  const rb = statusRuns(b, await b.blockStatus());
  let i = 0;
  let j = 0;
  for (let pos = 0; pos < size;) {
    while (ra[i]!.start + ra[i]!.length <= pos) i++;
    while (rb[j]!.start + rb[j]!.length <= pos) j++;
    const wa = answer(a, ra, i, pos);
    const wb = answer(b, rb, j, pos);
    if (wa.word !== wb.word) return pos;
    pos = Math.min(wa.end, wb.end);
  }
  return undefined;
}

type Run = MapEntry & { compressed: boolean };

/**
 * The image's status as qemu's answers divide it: runs merged by map's rule (mapEntries), and a
 * compressed cluster an answer of its own (its data lies nowhere else's).
 */
function statusRuns(img: Image, status: readonly BlockStatus[]): Run[] {
  const out: Run[] = [];
  for (const s of status) {
    if (s.length === 0) continue;
    if (s.compressed) {
      const cs = img.clusterSize;
      for (let p = s.start; p < s.start + s.length; p = (Math.floor(p / cs) + 1) * cs) {
        out.push({ ...mapEntries([s], [])[0]!, start: p, length: Math.min(s.start + s.length, (Math.floor(p / cs) + 1) * cs) - p, compressed: true });
      }
      continue;
    }
    const e: Run = { ...mapEntries([s], [])[0]!, compressed: false };
    const prev = out[out.length - 1];
    if (prev && !prev.compressed && mapEntries([prev, e], []).length === 1) prev.length += e.length;
    else out.push(e);
  }
  return out;
}

/**
 * qemu's answer for `pos` (bdrv_block_status_above): its flag word and where it ends. The top
 * layer answers first — to the end of its run, within its L2 table; where the top allocates
 * nothing, the layer below answers within that, and so on. An answer from below the top carries
 * EOF only when the top's reached the end and it does too; past the end of a shorter backing
 * file the answer is zeros, allocated there.
 */
function answer(img: Image, runs: readonly Run[], i: number, pos: number): { word: number; end: number } {
  const size = img.virtualSize;
  const run = runs[i]!;
  if (run.depth === 0 && run.present) {
    const end = Math.min(run.start + run.length, sliceEnd(img, pos));
    return { word: statusWord(run, end === size), end };
  }
  let topEnd = run.start + run.length;
  for (let k = i + 1; k < runs.length && !(runs[k]!.depth === 0 && runs[k]!.present); k++) topEnd = runs[k]!.start + runs[k]!.length;
  topEnd = Math.min(topEnd, sliceEnd(img, pos));
  let layer: Image | undefined = img;
  for (let d = 0; d < run.depth && layer; d++) layer = layer.backing;
  const end = Math.min(run.start + run.length, topEnd, run.present && layer ? sliceEnd(layer, pos) : Infinity);
  let bottom: Image = img;
  while (bottom.backing) bottom = bottom.backing;
  // Unallocated all the way down: the bottom layer's own answer, EOF at its own end.
  const toEnd = (topEnd === size && end === size) || (!run.present && bottom !== img && end === bottom.virtualSize);
  let shorter = false;
  for (let l = img.backing; l && !run.present; l = l.backing) if (l.virtualSize <= pos) shorter = true;
  return { word: shorter ? 2 | 16 | (toEnd ? 32 : 0) : statusWord(run, toEnd), end };
}

/** Where a qcow2 layer's answer for `pos` must end: the end of the L2 table that maps it. */
function sliceEnd(img: Image, pos: number): number {
  if (img.format !== 'qcow2') return Infinity;
  const span = img.clusterSize * (img.clusterSize / 8);
  return (Math.floor(pos / span) + 1) * span;
}

/** qemu's BDRV_BLOCK_* flags of a run: DATA 1, ZERO 2, OFFSET_VALID 4, ALLOCATED 16, EOF 32, COMPRESSED 64. */
function statusWord(run: Run, toEnd: boolean): number {
  return (run.data ? 1 : 0) | (run.zero ? 2 : 0) | (run.offset !== undefined ? 4 : 0) | (run.present ? 16 : 0) | (toEnd ? 32 : 0) | (run.compressed ? 64 : 0);
}
