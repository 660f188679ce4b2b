/**
 * `qemu-img convert [-f fmt] [-O qcow2|raw] [-o opts] [-B backing -F fmt] [-c] [-n] [-p]
 * [--bitmaps [--skip-broken-bitmaps]] src dst`: copies the guest-visible content of `src` (with
 * its backing chain) into a new image (engine/copy-image.ts: the core copier, sparse, and in the
 * native helper where it can), or into an existing one (`-n`). With a backing file for the target
 * (`-B`), only what the source's top image allocates is copied, as qemu-img does: the backing file
 * is taken to hold what the source's backing chain holds. `-c` writes compressed clusters.
 *
 * Like qemu-img, the target is written with cache mode `unsafe` unless `-t` says otherwise: no
 * flush to stable storage at the end (a convert that is interrupted leaves a target to throw away
 * anyway). Any other mode flushes the target before returning.
 */
import { realpath } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { FailedPrecondition, InvalidArgument, Unsupported, UsageError, type ByteRange } from '../../../core/index.js';
import { copyImageContent, createImage, openImage, type BitmapInfo, type Image, type ImageFormat } from '../engine/index.js';
import { engineOptions, withBacking } from './create.js';
import { parseCreationOptions, splitOptions, validateQcow2Options, type CreationOptions } from './create-options.js';

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
  /** `-n`: write into the existing target instead of creating it (it must be at least as large as the source). */
  skipCreate?: boolean;
  /** `-O` was given: without it, `-n` refuses a target that is not raw (qemu-img would overwrite it as raw). */
  dstFormatGiven?: boolean;
  /** `-B`/`-F`: the target's backing file and its format; only the source's top image's allocations are copied. */
  backingFile?: string;
  backingFormat?: ImageFormat;
  /** `-c`: compressed clusters (qcow2 targets). */
  compress?: boolean;
}

export const CACHE_MODES = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'] as const;
export type CacheMode = (typeof CACHE_MODES)[number];

export async function runConvert(args: ConvertArgs): Promise<void> {
  if (args.skipBrokenBitmaps && !args.bitmaps) throw new UsageError('Use of --skip-broken-bitmaps requires --bitmaps');
  if (args.skipCreate && args.options.length > 0) throw new UsageError('-o has no effect when skipping image creation');
  if (args.backingFormat !== undefined && args.backingFile === undefined) throw new UsageError('Backing format cannot be used without backing file');
  if (args.compress && args.dstFormat !== 'qcow2') {
    throw new Unsupported('Compression not supported for this file format', { hint: 'compressed clusters are a qcow2 feature: convert with -O qcow2' });
  }
  const src = await openImage(args.src, { readOnly: true, ...(args.srcFormat ? { format: args.srcFormat } : {}) });
  try {
    await refuseOverwritingSource(src, args.dst);
    const carried = args.bitmaps ? await bitmapsToCarry(src, args) : [];
    const opts = args.skipCreate ? undefined : await creationOptions(args, src.virtualSize);
    // A target with a backing file gets only what the source's top image allocates (qemu-img's -B).
    const withBacking = args.skipCreate ? args.backingFile !== undefined : opts!.backingFile !== undefined;
    const only = withBacking ? await topAllocations(src) : undefined;
    if (opts) await createImage(args.dst, engineOptions(args.dstFormat, opts));
    const dst = args.skipCreate ? await openExisting(args, src.virtualSize) : await openImage(args.dst, {
      readOnly: false, format: args.dstFormat, deferMetadata: true, ...(withBacking ? {} : { noBacking: true }),
      cache: args.cache === 'unsafe' || args.cache === undefined ? 'unsafe' : 'writeback',
    });
    try {
      await copyImageContent(src, dst, { fresh: !args.skipCreate && !withBacking, ...(only ? { only } : {}), compress: args.compress === true }, args.progress);
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

/** The new target's options: -o, then -B/-F over them (as `create` takes -b/-F); its backing file must open. */
async function creationOptions(args: ConvertArgs, size: number): Promise<CreationOptions> {
  const opts = withBacking(parseCreationOptions(args.dstFormat, args.options.flatMap(splitOptions)), args.backingFile, args.backingFormat);
  if (args.dstFormat === 'qcow2') validateQcow2Options(opts);
  opts.size = size;
  if (opts.backingFile !== undefined) {
    if (args.dstFormat === 'raw') throw new InvalidArgument("Backing file not supported for file format 'raw'", { hint: 'convert to qcow2 (-O qcow2)' });
    if (opts.backingFormat === undefined) throw new InvalidArgument('Use of backing file requires explicit backing format', { hint: 'give it with -F qcow2 or -F raw' });
    // Before the target is made: a backing file that does not open leaves no target behind.
    const backing = await openImage(resolve(dirname(args.dst), opts.backingFile), { readOnly: true, noBacking: true, format: opts.backingFormat });
    await backing.close();
  }
  return opts;
}

/** `-n`: the target as it is, in the format -O names (or, without -O, a raw file only), at least as large as the source. */
async function openExisting(args: ConvertArgs, size: number): Promise<Image> {
  const dst = await openImage(args.dst, { readOnly: false, ...(args.dstFormatGiven ? { format: args.dstFormat } : {}), cache: args.cache === 'unsafe' || args.cache === undefined ? 'unsafe' : 'writeback' });
  try {
    if (dst.format !== args.dstFormat) {
      throw new InvalidArgument(`${args.dst} is a ${dst.format} image, and -O is ${args.dstFormat} (the default): -n would overwrite it as ${args.dstFormat}`, {
        ref: args.dst, hint: `give -O ${dst.format} to write into the image, or -O ${args.dstFormat} to overwrite the file's bytes`,
      });
    }
    if (dst.virtualSize < size) throw new InvalidArgument('output file is smaller than input file', { ref: args.dst, hint: `resize it to ${size} bytes at least first` });
    if (args.compress && dst.format !== 'qcow2') throw new Unsupported('Compression not supported for this file format', { ref: args.dst });
    return dst;
  } catch (e) {
    await dst.close();
    throw e;
  }
}

/**
 * The ranges a target with a backing file gets, as qemu-img decides them: where the source's top
 * image allocates (data or zeros), and where the source reads zeros of its own — it has no
 * backing file, or the range lies past its backing file's end. The rest shows the target's backing.
 */
async function topAllocations(src: Image): Promise<ByteRange[]> {
  const out: ByteRange[] = [];
  const add = (offset: number, end: number) => {
    if (end <= offset) return;
    const last = out[out.length - 1];
    if (last && last.offset + last.length === offset) last.length += end - offset;
    else out.push({ offset, length: end - offset });
  };
  const backingEnd = src.backing ? src.backing.virtualSize : 0;
  for (const st of await src.blockStatus()) {
    const end = st.start + st.length;
    if (st.depth === 0 && st.present) add(st.start, end);
    else if (!st.present) add(Math.max(st.start, backingEnd), end);
  }
  return out;
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
