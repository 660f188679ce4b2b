/**
 * `qemu-img create [-f fmt] [-o opts] [-b backing -F fmt] [-u] [-q] file [size]`: prints qemu-img's
 * "Formatting …" line (options in qemu's order, values as given) and writes QEMU's fresh layout.
 * Without a size the backing file's size is used; the backing file must open unless `-u`.
 */
import { dirname, resolve } from 'node:path';
import { InvalidArgument } from '../../../core/index.js';
import { createImage, openImage, type CreateOptions, type ImageFormat } from '../engine/index.js';
import { parseCreationOptions, splitOptions, validateQcow2Options, type CreationOptions } from './create-options.js';
import type { ImgOutput } from './output.js';
import { parseImageSize } from './sizes.js';

export interface CreateArgs {
  file: string;
  size?: string;
  format: ImageFormat;
  options: string[];
  backingFile?: string;
  backingFormat?: ImageFormat;
  unsafe?: boolean;
  quiet?: boolean;
}

export async function runCreate(args: CreateArgs, out: ImgOutput): Promise<void> {
  const opts = withBacking(parseCreationOptions(args.format, args.options.flatMap(splitOptions)), args.backingFile, args.backingFormat);
  if (args.size !== undefined) opts.size = parseImageSize(args.size);
  if (args.format === 'raw' && opts.backingFile !== undefined) {
    throw new InvalidArgument(`${args.file}: raw images cannot have a backing file`);
  }
  if (args.format === 'qcow2') validateQcow2Options(opts);
  if (opts.backingFile !== undefined) {
    if (opts.backingFormat === undefined) {
      throw new InvalidArgument(`${args.file}: Backing file specified without backing format`, { hint: 'give it with -F qcow2 or -F raw' });
    }
    if (!args.unsafe) {
      // Like qemu-img: the backing file must open, and gives the size when none was given.
      const backingPath = resolve(dirname(args.file), opts.backingFile);
      const backing = await openImage(backingPath, { readOnly: true, noBacking: true, format: opts.backingFormat });
      opts.size ??= backing.virtualSize;
      await backing.close();
    }
  }
  if (opts.size === undefined) {
    throw new InvalidArgument(`${args.file}: Image creation needs a size parameter`);
  }
  if (!args.quiet) out.print({ filename: args.file, format: args.format, size: opts.size }, formattingLine(args.file, args.format, opts));
  await createImage(args.file, engineOptions(args.format, opts));
}

/** `-b`/`-F` (`convert`'s `-B`/`-F`) over what `-o` said: the options, changed. */
export function withBacking(opts: CreationOptions, file: string | undefined, format: ImageFormat | undefined): CreationOptions {
  if (file !== undefined) {
    opts.backingFile = file;
    opts.given.set('backing_file', file);
  }
  if (format !== undefined) {
    opts.backingFormat = format;
    opts.given.set('backing_fmt', format);
  }
  return opts;
}

export function engineOptions(format: ImageFormat, o: CreationOptions): CreateOptions {
  const c: CreateOptions = { format, overwrite: true };
  if (o.size !== undefined) c.size = o.size;
  if (format === 'raw') return c;
  if (o.clusterSize !== undefined) c.clusterSize = o.clusterSize;
  if (o.compat !== undefined) c.compat = o.compat;
  if (o.lazyRefcounts !== undefined) c.lazyRefcounts = o.lazyRefcounts;
  if (o.refcountBits !== undefined) c.refcountBits = o.refcountBits;
  if (o.backingFile !== undefined) c.backingFile = o.backingFile;
  if (o.backingFormat !== undefined) c.backingFormat = o.backingFormat;
  if (o.compressionType !== undefined) c.compressionType = o.compressionType;
  return c;
}

/** qemu-img's "Formatting 'f', fmt=qcow2 cluster_size=65536 … refcount_bits=16" line. */
export function formattingLine(file: string, format: ImageFormat, o: CreationOptions): string {
  const parts = [`Formatting '${file}', fmt=${format}`];
  if (format === 'raw') {
    parts.push(`size=${o.size}`);
    if (o.given.get('preallocation') !== undefined) parts.push(`preallocation=${o.given.get('preallocation')}`);
  } else {
    const given = (k: string) => o.given.get(k);
    parts.push(`cluster_size=${o.clusterSize ?? 65536}`);
    parts.push(`extended_l2=${given('extended_l2') ?? 'off'}`);
    if (given('preallocation') !== undefined) parts.push(`preallocation=${given('preallocation')}`);
    parts.push(`compression_type=${given('compression_type') ?? 'zlib'}`);
    parts.push(`size=${o.size}`);
    if (given('compat') !== undefined) parts.push(`compat=${given('compat')}`);
    if (o.backingFile !== undefined) parts.push(`backing_file=${o.backingFile}`);
    if (o.backingFormat !== undefined) parts.push(`backing_fmt=${o.backingFormat}`);
    parts.push(`lazy_refcounts=${given('lazy_refcounts') ?? 'off'}`);
    parts.push(`refcount_bits=${o.refcountBits ?? 16}`);
  }
  return parts.join(' ');
}
