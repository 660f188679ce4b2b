/**
 * `qemu-img convert [-f fmt] [-O qcow2|raw] [-o opts] [-p] src dst`: copies the guest-visible
 * content of `src` (with its backing chain) into a new image (engine/copy-image.ts: the core
 * copier, sparse, and in the native helper where it can).
 *
 * Like qemu-img, the target is written with cache mode `unsafe` unless `-t` says otherwise: no
 * flush to stable storage at the end (a convert that is interrupted leaves a target to throw away
 * anyway). Any other mode flushes the target before returning.
 */
import { realpath } from 'node:fs/promises';
import { InvalidArgument } from '../../../core/index.js';
import { copyImageContent, createImage, openImage, type Image, type ImageFormat } from '../engine/index.js';
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
      await copyImageContent(src, dst, args.progress);
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
