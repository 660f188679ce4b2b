/**
 * `convert`'s copy: the guest content of an image (with its backing chain) into another image,
 * through the core copier over two image devices, so the native helper moves what it can
 * (image-device.ts) and the rest is read and written with blocks of zeros left out; or, for
 * `convert -c`, cluster by cluster into compressed clusters.
 */
import { copyData, JobRun, type ByteRange } from '../../../core/index.js';
import { imageDevice } from './image-device.js';
import type { Image } from './types.js';

export interface CopyProgress {
  update(current: number, total: number): void;
}

export interface CopyContentOptions {
  /**
   * The target reads as zeros wherever nothing is written (a new image with no backing file):
   * zeros of the source are skipped. Otherwise they are written as zeros.
   */
  fresh: boolean;
  /** Copy only these ranges (sorted): the rest of the target is left as it is (its backing file shows there). */
  only?: ByteRange[];
  /** Whole clusters as compressed clusters (qcow2 targets; where the target has nothing allocated). */
  compress?: boolean;
}

/** Copy the content of `src` into `dst` (the first min(sizes) bytes); progress in bytes of the virtual size. */
export async function copyImageContent(src: Image, dst: Image, opts: CopyContentOptions, progress?: CopyProgress): Promise<void> {
  const size = Math.min(src.virtualSize, dst.virtualSize);
  if (opts.compress) {
    await copyCompressed(src, dst, size, opts, progress);
  } else {
    const run = new JobRun({
      jobId: 'convert',
      onProgress: (current, total) => progress?.update(total === 0 ? size : Math.min(size, Math.floor((current / total) * size)), size),
    });
    await copyData(await imageDevice(src, { mode: 'r' }), await imageDevice(dst, { mode: 'rw' }), run, {
      targetFresh: opts.fresh, ...(opts.only ? { only: opts.only } : {}),
    });
  }
  progress?.update(size, size);
}

/** Bytes read and compressed at once (its clusters are deflated on the thread pool together). */
const BATCH = 4 * 1024 * 1024;

/**
 * Every target cluster the source's data touches, read whole from the source and written
 * compressed (all-zero ones skipped, or made zero on a target that is not fresh); the rest of
 * the range to copy is made zero on a target that is not fresh.
 */
async function copyCompressed(src: Image, dst: Image, size: number, opts: CopyContentOptions, progress?: CopyProgress): Promise<void> {
  const cs = dst.clusterSize;
  const scope = opts.only ?? [{ offset: 0, length: size }];
  const data = (await (await imageDevice(src, { mode: 'r' })).extents(0, size)).filter((e) => e.kind === 'data');
  // Data clusters: [first, end) cluster runs, merged.
  const clusters: [number, number][] = [];
  for (const r of intersect(data, scope)) {
    const a = Math.floor(r.offset / cs);
    const b = Math.ceil((r.offset + r.length) / cs);
    const last = clusters[clusters.length - 1];
    if (last && a <= last[1]) last[1] = Math.max(last[1], b);
    else clusters.push([a, b]);
  }
  const zero = async (offset: number, end: number) => {
    if (!opts.fresh && end > offset) await dst.writeZeroes(offset, end - offset);
  };
  // A last partial cluster is compressed only where the target ends too (a larger target, -n: as it is).
  const put = async (offset: number, bytes: Uint8Array) => {
    const end = offset + bytes.length;
    const whole = end % cs === 0 || end === dst.virtualSize ? end : end - (end % cs);
    if (whole > offset) await dst.writeCompressed(offset, bytes.subarray(0, whole - offset));
    if (end > whole) await dst.write(whole, bytes.subarray(whole - offset));
  };
  // Outside the data clusters, the scope reads as zeros: made so first, so that no zeroing touches a data cluster.
  const dataRanges = clusters.map(([a, b]) => ({ offset: a * cs, length: Math.min(size, b * cs) - a * cs }));
  for (const r of subtract(scope, dataRanges)) await zero(r.offset, r.offset + r.length);
  for (const [a, b] of clusters) {
    for (let c = a; c < b; c += BATCH / cs) {
      const start = c * cs;
      const end = Math.min(size, Math.min(b, c + BATCH / cs) * cs);
      const buf = await src.read(start, end - start);
      // Runs of non-zero clusters are written compressed; all-zero ones are zeros.
      let run = start;
      for (let p = start; p <= end; p = p === end ? end + 1 : Math.min(end, p + cs)) {
        const isZero = p < end && isAllZero(buf.subarray(p - start, Math.min(end, p + cs) - start));
        if (p === end || isZero) {
          if (p > run) await put(run, buf.subarray(run - start, p - start));
          if (isZero) await zero(p, Math.min(end, p + cs));
          run = Math.min(end, p + cs);
        }
      }
      progress?.update(end, size);
    }
  }
}

function isAllZero(b: Uint8Array): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

/** The parts of sorted ranges `a` inside sorted ranges `b`. */
function intersect(a: readonly ByteRange[], b: readonly ByteRange[]): ByteRange[] {
  const out: ByteRange[] = [];
  let j = 0;
  for (const r of a) {
    const rEnd = r.offset + r.length;
    while (j < b.length && b[j]!.offset + b[j]!.length <= r.offset) j++;
    for (let k = j; k < b.length && b[k]!.offset < rEnd; k++) {
      const s = Math.max(r.offset, b[k]!.offset);
      const e = Math.min(rEnd, b[k]!.offset + b[k]!.length);
      if (e > s) out.push({ offset: s, length: e - s });
    }
  }
  return out;
}

/** The parts of sorted ranges `a` outside sorted ranges `b`. */
function subtract(a: readonly ByteRange[], b: readonly ByteRange[]): ByteRange[] {
  const out: ByteRange[] = [];
  for (const r of a) {
    let p = r.offset;
    const end = r.offset + r.length;
    for (const x of b) {
      if (x.offset + x.length <= p || x.offset >= end) continue;
      if (x.offset > p) out.push({ offset: p, length: x.offset - p });
      p = Math.max(p, x.offset + x.length);
    }
    if (end > p) out.push({ offset: p, length: end - p });
  }
  return out;
}
