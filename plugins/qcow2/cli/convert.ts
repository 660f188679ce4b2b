/**
 * `qemu-img convert [-f fmt] [-O qcow2|raw] [-o opts] [-p] src dst`: copies the guest-visible
 * content of `src` (with its backing chain) into a new image. Ranges the source reports as zero
 * are not read, and 4 KiB blocks that read as zero are not written (qemu-img's default `-S 4k`),
 * so the target stays sparse. Memory is bounded by a few chunks.
 *
 * Like qemu-img, the target is written with cache mode `unsafe` unless `-t` says otherwise: no
 * flush to stable storage at the end (a convert that is interrupted leaves a target to throw away
 * anyway). Any other mode flushes the target before returning.
 */
import { realpath } from 'node:fs/promises';
import { InvalidArgument } from '../../../core/index.js';
import { uninitialized } from '../format/bytes.js';
import { nonZeroRuns } from '../engine/zero-scan.js';
import { createImage, openImage, type Image, type ImageFormat } from '../index.js';
import { engineOptions } from './create.js';
import { parseCreationOptions, splitOptions, validateQcow2Options } from './create-options.js';

export interface ConvertArgs {
  src: string;
  dst: string;
  srcFormat?: ImageFormat;
  dstFormat: ImageFormat;
  options: string[];
  /** Target cache mode (qemu-img `-t`); only `unsafe` (the default) skips the final flush. */
  cache?: CacheMode;
  progress?: { update(current: number, total: number): void; done(): void };
}

export const CACHE_MODES = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'] as const;
export type CacheMode = (typeof CACHE_MODES)[number];

const CHUNK = 2 * 1024 * 1024;
/**
 * Chunks copied at once: as many as the thread pool has threads. Writes to the target go one at
 * a time anyway (ImageFile); more readers only compete for the two cores (measured: 8 was ~8 %
 * slower than 4, 1 was ~20 % slower).
 */
const IN_FLIGHT = 4;

export async function runConvert(args: ConvertArgs): Promise<void> {
  const src = await openImage(args.src, { readOnly: true, ...(args.srcFormat ? { format: args.srcFormat } : {}) });
  try {
    await refuseOverwritingSource(src, args.dst);
    const opts = parseCreationOptions(args.dstFormat, args.options.flatMap(splitOptions));
    if (args.dstFormat === 'qcow2') validateQcow2Options(opts);
    opts.size = src.virtualSize;
    await createImage(args.dst, engineOptions(args.dstFormat, opts));
    const dst = await openImage(args.dst, {
      readOnly: false, format: args.dstFormat, noBacking: true, deferMetadata: true,
      cache: args.cache === 'unsafe' || args.cache === undefined ? 'unsafe' : 'writeback',
    });
    try {
      await copyContent(src, dst, args.progress);
      await dst.flush();
    } finally {
      await dst.close();
    }
  } finally {
    await src.close();
    args.progress?.done();
  }
}

/** Creating the target truncates it: it must not be the source or one of its backing files. */
async function refuseOverwritingSource(src: Image, dst: string): Promise<void> {
  const target = await realpath(dst).catch(() => undefined);
  if (target === undefined) return; // does not exist yet
  for (let layer: Image | undefined = src; layer; layer = layer.backing) {
    if ((await realpath(layer.path).catch(() => layer!.path)) === target) {
      throw new InvalidArgument(`convert: the target ${dst} is ${layer === src ? 'the source image' : 'a backing file of the source'}`, {
        ref: dst,
        hint: 'write the converted image to a new file',
      });
    }
  }
}

/**
 * Copy every non-zero byte of `src` into `dst` (which reads as zeroes to begin with). Up to
 * IN_FLIGHT chunks are read and written at once (like qemu-img's parallel requests), so the
 * disk is kept busy; memory is bounded by IN_FLIGHT chunks.
 */
export async function copyContent(src: Image, dst: Image, progress?: ConvertArgs['progress']): Promise<void> {
  const total = src.virtualSize;
  const chunks = dataChunks(await dataMap(src));
  let failure: unknown;
  let done = 0;
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
      done = Math.max(done, pos + n);
      progress?.update(done, total);
    }
  };
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
  if (failure !== undefined) throw failure;
  progress?.update(total, total);
}

/** [offset, length] of each chunk to copy, generated as needed (the map may be long). */
function* dataChunks(map: readonly { start: number; length: number; zero: boolean }[]): Generator<[number, number]> {
  for (const seg of map) {
    if (seg.zero) continue;
    const end = seg.start + seg.length;
    for (let pos = seg.start; pos < end; pos += CHUNK) yield [pos, Math.min(CHUNK, end - pos)];
  }
}

/**
 * The ranges to copy. A raw file's holes come from the file system (SEEK_DATA, RawImage's
 * exactBlockStatus) when the native helper can say where they are; otherwise the file is read
 * straight through (zero blocks are skipped when writing): its block status would cost a full
 * scan of the file anyway.
 */
export async function dataMap(img: Image): Promise<{ start: number; length: number; zero: boolean }[]> {
  if (img.format === 'raw') {
    type Seekable = { exactBlockStatus?: () => Promise<{ start: number; length: number; zero: boolean }[] | undefined> };
    const exact = await (img as Image & Seekable).exactBlockStatus?.();
    return exact ?? [{ start: 0, length: img.virtualSize, zero: false }];
  }
  return img.map();
}
