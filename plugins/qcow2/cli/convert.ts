/**
 * `qemu-img convert [-f fmt] [-O qcow2|raw] [-o opts] [-p] [--bitmaps [--skip-broken-bitmaps]] src dst`: copies the guest-visible
 * content of `src` (with its backing chain) into a new image (engine/copy-image.ts: the core
 * copier, sparse, and in the native helper where it can).
 *
 * Like qemu-img, the target is written with cache mode `unsafe` unless `-t` says otherwise: no
 * flush to stable storage at the end (a convert that is interrupted leaves a target to throw away
 * anyway). Any other mode flushes the target before returning.
 */
import { realpath } from 'node:fs/promises';
import { FailedPrecondition, InvalidArgument, Unsupported, UsageError } from '../../../core/index.js';
import { copyImageContent, createImage, openImage, type BitmapInfo, type Image, type ImageFormat } from '../engine/index.js';
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
  /** `--bitmaps`: carry the source's persistent bitmaps (qcow2 to qcow2). */
  bitmaps?: boolean;
  /** `--skip-broken-bitmaps`: leave inconsistent ones out, with a warning, instead of failing. */
  skipBrokenBitmaps?: boolean;
  /** Where warnings go (qemu-img prints them on stderr). */
  warn?: (line: string) => void;
}

export const CACHE_MODES = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'] as const;
export type CacheMode = (typeof CACHE_MODES)[number];

export async function runConvert(args: ConvertArgs): Promise<void> {
  if (args.skipBrokenBitmaps && !args.bitmaps) throw new UsageError('Use of --skip-broken-bitmaps requires --bitmaps');
  const src = await openImage(args.src, { readOnly: true, ...(args.srcFormat ? { format: args.srcFormat } : {}) });
  try {
    await refuseOverwritingSource(src, args.dst);
    const carried = args.bitmaps ? await bitmapsToCarry(src, args) : [];
    const opts = parseCreationOptions(args.dstFormat, args.options.flatMap(splitOptions));
    if (args.dstFormat === 'qcow2') validateQcow2Options(opts);
    opts.size = src.virtualSize;
    await createImage(args.dst, engineOptions(args.dstFormat, opts));
    const dst = await openImage(args.dst, {
      readOnly: false, format: args.dstFormat, noBacking: true, deferMetadata: true,
      cache: args.cache === 'unsafe' || args.cache === undefined ? 'unsafe' : 'writeback',
    });
    try {
      await copyImageContent(src, dst, args.progress);
      // After the data, as qemu-img does: the copy itself marks nothing.
      for (const b of carried) {
        await dst.bitmaps.add(b.name, { granularity: b.granularity, disabled: !b.enabled });
        await dst.bitmaps.merge(b.name, { image: src, name: b.name });
      }
      await dst.flush();
    } finally {
      await dst.close();
    }
  } finally {
    await src.close();
    args.progress?.done();
  }
}

/** The source's bitmaps that `--bitmaps` copies (its top image's, as qemu-img copies them). */
async function bitmapsToCarry(src: Image, args: ConvertArgs): Promise<BitmapInfo[]> {
  if (args.dstFormat !== 'qcow2') throw new Unsupported(`Format driver '${args.dstFormat}' does not support bitmaps`, { hint: 'convert to qcow2 (-O qcow2)' });
  const out: BitmapInfo[] = [];
  // qemu-img walks its bitmap list newest first (QEMU inserts at the head): its errors and
  // warnings come in that order.
  for (const b of (await src.bitmaps.info()).reverse()) {
    if (!b.inconsistent) out.unshift(b);
    else if (args.skipBrokenBitmaps) args.warn?.(`warning: Skipping inconsistent bitmap '${b.name}'`);
    else {
      throw new FailedPrecondition(`Cannot copy inconsistent bitmap '${b.name}'`, {
        hint: "Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
      });
    }
  }
  return out;
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
