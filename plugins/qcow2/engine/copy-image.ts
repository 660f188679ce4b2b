/**
 * Copying the guest content of an image (with its backing chain) into a new image, for
 * `convert`. Ranges the source reports as zero are not read, and blocks that read as zero are
 * not written (qemu-img's default `-S 4k`), so the target stays sparse.
 *
 * Two ways, chosen per range:
 * - Native: where the source's bytes lie as they are in one file (raw data, uncompressed qcow2
 *   clusters), and the target takes a native copy (raw, or qcow2 over whole clusters), the copy
 *   runs in the native helper (ImageFile.copyIn): one call per nativeBatch(), with no JavaScript
 *   between a read and its write.
 * - Through the engine: everything else (compressed clusters, edges of clusters, no native
 *   helper), IN_FLIGHT chunks at a time; memory is bounded by those chunks.
 */
import { uninitialized } from '../format/bytes.js';
import { nativeCopyAvailable, type ImageFile } from './file.js';
import { ImageHandle } from './image-handle.js';
import type { Image } from './types.js';
import { nonZeroRuns } from './zero-scan.js';

export interface CopyProgress {
  update(current: number, total: number): void;
}

/** A range of the source image, and where its bytes lie when one file holds them as they are. */
interface Segment {
  start: number;
  length: number;
  zero: boolean;
  host?: { file: ImageFile; offset: number };
}

/** Targets that take a native copy (RawImage, Qcow2Image): see their copyFromFile. */
interface CopyTarget {
  copyFromFile(src: ImageFile, ops: Float64Array): Promise<void>;
}

const CHUNK = 2 * 1024 * 1024;
/**
 * Chunks copied at once through the engine: as many as the thread pool has threads. Writes to
 * the target go one at a time anyway (ImageFile); more readers only compete for the two cores
 * (measured: 8 was ~8 % slower than 4, 1 was ~20 % slower).
 */
const IN_FLIGHT = 4;
/**
 * Bytes per native copy call: progress is reported per call, a qcow2 target reserves space for
 * one call at a time, and the helper returns a [guest, host] pair (16 bytes) per cluster it
 * writes there: 2^16 clusters a call, between 256 MiB and 1 GiB (both multiples of every cluster
 * size). Each call starts the helper's pipeline afresh and, into qcow2, updates the L2 tables
 * before the next can start: 2 calls instead of 1 cost ~6 ms of a 512 MiB convert.
 */
const MIN_BATCH = 256 * 1024 * 1024;
const MAX_BATCH = 1024 * 1024 * 1024;
function nativeBatch(dst: Image): number {
  if (dst.format !== 'qcow2') return MAX_BATCH;
  return Math.min(MAX_BATCH, Math.max(MIN_BATCH, dst.clusterSize * 2 ** 16));
}

/** Copy every non-zero byte of `src` into `dst`, a new image that reads as zeros. */
export async function copyImageContent(src: Image, dst: Image, progress?: CopyProgress): Promise<void> {
  const total = src.virtualSize;
  const target = nativeCopyAvailable() ? copyTarget(dst) : undefined;
  const align = dst.format === 'qcow2' ? dst.clusterSize : 1;
  const native = new Map<ImageFile, number[]>(); // source file → [srcPos, guest, length]…
  const engine: [number, number][] = []; // [start, length] copied through the engine
  let dataBytes = 0;
  for (const seg of await sourceSegments(src, target !== undefined)) {
    if (seg.zero) continue;
    const end = seg.start + seg.length;
    dataBytes += seg.length;
    // The target takes whole clusters: the edges of a range that cuts one go through the engine.
    const a = alignUp(seg.start, align);
    const b = end === total ? end : end - (end % align);
    if (!seg.host || a >= b) {
      engine.push([seg.start, seg.length]);
      continue;
    }
    if (a > seg.start) engine.push([seg.start, a - seg.start]);
    const ops = native.get(seg.host.file) ?? native.set(seg.host.file, []).get(seg.host.file)!;
    ops.push(seg.host.offset + (a - seg.start), a, b - a);
    if (b < end) engine.push([b, end - b]);
  }
  let done = 0;
  const report = (n: number) => {
    done += n;
    progress?.update(dataBytes === 0 ? total : Math.floor((done / dataBytes) * total), total);
  };
  for (const [file, ops] of native) {
    for (const batch of batches(ops, nativeBatch(dst))) {
      await target!.copyFromFile(file, batch.ops);
      report(batch.bytes);
    }
  }
  await copyThroughEngine(src, dst, engine, report);
  progress?.update(total, total);
}

/** Ops in calls of at most `limit` bytes (a long op is cut at a multiple of `limit`). */
function* batches(ops: number[], limit: number): Generator<{ ops: Float64Array; bytes: number }> {
  let cur: number[] = [];
  let bytes = 0;
  for (let i = 0; i < ops.length; i += 3) {
    let [srcPos, guest, len] = [ops[i]!, ops[i + 1]!, ops[i + 2]!];
    while (len > 0) {
      const n = Math.min(len, limit - bytes);
      cur.push(srcPos, guest, n);
      bytes += n;
      srcPos += n;
      guest += n;
      len -= n;
      if (bytes === limit) {
        yield { ops: Float64Array.from(cur), bytes };
        cur = [];
        bytes = 0;
      }
    }
  }
  if (cur.length > 0) yield { ops: Float64Array.from(cur), bytes };
}

/** Copy `ranges` of src into dst by reading and writing through the engine, IN_FLIGHT chunks at once. */
async function copyThroughEngine(src: Image, dst: Image, ranges: [number, number][], report: (n: number) => void): Promise<void> {
  if (ranges.length === 0) return; // not even the workers' buffers
  const chunks = chunksOf(ranges);
  let failure: unknown;
  const worker = async () => {
    const buf = uninitialized(CHUNK); // one per worker, reused for every chunk
    for (let c = chunks.next(); !c.done && failure === undefined; c = chunks.next()) {
      const [pos, n] = c.value;
      try {
        const data = buf.subarray(0, n);
        await src.readInto(data, pos);
        for (const [from, to] of nonZeroRuns(data)) await dst.write(pos + from, data.subarray(from, to));
      } catch (e) {
        failure ??= e;
        return;
      }
      report(n);
    }
  };
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
  if (failure !== undefined) throw failure;
}

/** [offset, length] of each chunk to copy, generated as needed (the list may be long). */
function* chunksOf(ranges: [number, number][]): Generator<[number, number]> {
  for (const [start, length] of ranges) {
    const end = start + length;
    for (let pos = start; pos < end; pos += CHUNK) yield [pos, Math.min(CHUNK, end - pos)];
  }
}

/**
 * The source's ranges; with `hosts`, where each data range lies in a file when its bytes are
 * there as they are (not compressed, and within the file: a range past the end of its file
 * goes through the engine, which reports or zero-fills it as a read would).
 */
async function sourceSegments(img: Image, hosts: boolean): Promise<Segment[]> {
  if (img.format === 'raw') {
    const file = hosts ? fileOf(img) : undefined;
    const size = file ? await file.size() : 0;
    return (await dataMap(img)).map((s) =>
      !file || s.zero || s.start + s.length > size ? s : { ...s, host: { file, offset: s.start } });
  }
  const layers: Image[] = [];
  for (let l: Image | undefined = img; l; l = l.backing) layers.push(l);
  const files = hosts ? layers.map(fileOf) : [];
  const sizes = await Promise.all(files.map((f) => f?.size() ?? 0));
  return (await img.map()).map((s) => {
    const file = files[s.depth];
    if (!file || s.zero || !s.data || s.compressed || s.offset === undefined || s.offset + s.length > sizes[s.depth]!) {
      return { start: s.start, length: s.length, zero: s.zero };
    }
    return { start: s.start, length: s.length, zero: false, host: { file, offset: s.offset } };
  });
}

/**
 * The ranges to copy. A raw file's holes come from the file system (SEEK_DATA, RawImage's
 * exactBlockStatus) when the native helper can say where they are; otherwise the file is read
 * straight through (zero blocks are skipped when writing): its block status would cost a full
 * scan of the file anyway.
 */
export async function dataMap(img: Image): Promise<{ start: number; length: number; zero: boolean }[]> {
  if (img.format === 'raw') {
    const exact = await ImageHandle.nodeOf(img)?.exactBlockStatus?.();
    return exact ?? [{ start: 0, length: img.virtualSize, zero: false }];
  }
  return img.map();
}

/** The file an engine image reads from (RawImage, Qcow2Image); undefined for other Images. */
function fileOf(img: Image): ImageFile | undefined {
  return ImageHandle.nodeOf(img)?.file;
}

function copyTarget(img: Image): CopyTarget | undefined {
  const node = ImageHandle.nodeOf(img);
  return node?.copyFromFile ? { copyFromFile: (src, ops) => node.copyFromFile!(src, ops) } : undefined;
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}
