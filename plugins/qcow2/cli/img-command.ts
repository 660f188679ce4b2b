/**
 * `offload img …`: the qcow2 engine on files, with qemu-img 7.2's option letters and output.
 * Each subcommand parses its options here and runs in its own module.
 */
import { Command, Option } from 'commander';
import { UsageError, commandGroup, type CliContext } from '../../../core/index.js';
import { runBitmap, type BitmapAction } from './bitmap.js';
import { runCheck } from './check.js';
import { runCompare } from './compare.js';
import { registerChainCommands } from './img-chain-commands.js';
import { CACHE_MODES, runConvert, type CacheMode } from './convert.js';
import { runCreate } from './create.js';
import { parseFormat } from './formats.js';
import { collectChainInfo, collectImageInfo, humanImageInfo } from './image-info.js';
import { runIo } from './io.js';
import { runMap } from './map.js';
import { imgOutput, processStderr, type StderrSink } from './output.js';
import { qemuJsonPretty } from './qemu-json.js';
import { runResize } from './resize.js';
import { parseImageSize } from './sizes.js';
import { runSnapshot, type SnapshotAction } from './snapshot.js';

export interface ImgCommandOptions {
  /** Where stderr lines go (default: the process's stderr). */
  stderr?: StderrSink;
}

function outputOption(): Option {
  return new Option('--output <format>', 'output format').choices(['human', 'json']).default('human');
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

/** Register `img` and its subcommands under `program`. */
export function registerImgCommands(program: Command, ctx: CliContext, options: ImgCommandOptions = {}): Command {
  const out = imgOutput(ctx, options.stderr ?? processStderr);
  const img = commandGroup(program, 'img', 'qemu-img compatible image tools (the native qcow2 engine on files)');

  img
    .command('create')
    .description('create a qcow2 or raw image')
    .option('-f <fmt>', 'image format: qcow2 or raw', 'raw')
    .option('-o <options>', 'creation options, e.g. cluster_size=64k,compat=1.1,lazy_refcounts=on,refcount_bits=16', collect, [])
    .option('-b <backing_file>', 'backing file (relative names resolve against the new image\'s folder)')
    .option('-F <backing_fmt>', 'backing file format: qcow2 or raw')
    .option('-u', 'do not open the backing file')
    .option('-q', 'quiet')
    .argument('<filename>')
    .argument('[size]', 'virtual size, with an optional k, M, G, T, P or E suffix')
    .action(async (filename: string, size: string | undefined, o: Record<string, unknown>) => {
      const format = parseFormat(o.f as string)!;
      await runCreate(
        {
          file: filename,
          format,
          options: o.o as string[],
          ...(size !== undefined ? { size } : {}),
          ...(o.b !== undefined ? { backingFile: o.b as string } : {}),
          ...(o.F !== undefined ? { backingFormat: parseFormat(o.F as string)! } : {}),
          unsafe: o.u === true,
          quiet: o.q === true,
        },
        out,
      );
    });

  img
    .command('info')
    .description('show an image\'s format, sizes, backing file and snapshots')
    .option('-f <fmt>', 'image format (probed when absent)')
    .addOption(outputOption())
    .option('--backing-chain', 'show every image of the backing chain')
    .option('-U, --force-share', 'accepted for compatibility (images are opened read-only)')
    .argument('<filename>')
    .action(async (filename: string, o: Record<string, unknown>) => {
      const format = parseFormat(o.f as string | undefined);
      if (o.backingChain) {
        const infos = await collectChainInfo(filename, format);
        if (o.output === 'json') out.print(infos, qemuJsonPretty(infos));
        else out.print(infos, infos.map((i) => humanImageInfo(i).join('\n')).join('\n\n'));
      } else {
        const { info } = await collectImageInfo(filename, format);
        out.print(info, o.output === 'json' ? qemuJsonPretty(info) : humanImageInfo(info).join('\n'));
      }
    });

  img
    .command('check')
    .description('check an image for leaks and corruption (exit 0 clean, 2 corrupt, 3 leaks, 63 unsupported)')
    .option('-f <fmt>', 'image format (probed when absent)')
    .addOption(outputOption())
    .addOption(new Option('-r <mode>', 'repair leaks, or all errors').choices(['leaks', 'all']))
    .option('-q', 'quiet')
    .option('-U, --force-share', 'accepted for compatibility')
    .argument('<filename>')
    .action(async (filename: string, o: Record<string, unknown>) => {
      const format = parseFormat(o.f as string | undefined);
      await runCheck(
        {
          file: filename,
          output: o.output as 'human' | 'json',
          quiet: o.q === true,
          ...(format ? { format } : {}),
          ...(o.r ? { repair: o.r as 'leaks' | 'all' } : {}),
        },
        out,
      );
    });

  img
    .command('map')
    .description('show the allocation map of an image and its backing chain')
    .option('-f <fmt>', 'image format (probed when absent)')
    .addOption(outputOption())
    .option('--start-offset <offset>', 'first byte to map')
    .option('--max-length <len>', 'bytes to map')
    .option('-U, --force-share', 'accepted for compatibility')
    .argument('<filename>')
    .action(async (filename: string, o: Record<string, unknown>) => {
      const format = parseFormat(o.f as string | undefined);
      await runMap(
        {
          file: filename,
          output: o.output as 'human' | 'json',
          ...(format ? { format } : {}),
          ...(o.startOffset !== undefined ? { startOffset: parseImageSize(o.startOffset as string, 'start offset') } : {}),
          ...(o.maxLength !== undefined ? { maxLength: parseImageSize(o.maxLength as string, 'length') } : {}),
        },
        out,
      );
    });

  img
    .command('compare')
    .description('compare the contents of two images (exit 0 identical, 1 different, 2 error)')
    .option('-f <fmt>', 'format of the first image')
    .option('-F <fmt>', 'format of the second image')
    .option('-s', 'strict: different sizes, or a range allocated in one image and not in the other, differ')
    .option('-U, --force-share', 'accepted for compatibility')
    .argument('<filename1>')
    .argument('<filename2>')
    .action(async (file1: string, file2: string, o: Record<string, unknown>) => {
      const format1 = parseFormat(o.f as string | undefined);
      const format2 = parseFormat(o.F as string | undefined);
      await runCompare({ file1, file2, ...(format1 ? { format1 } : {}), ...(format2 ? { format2 } : {}), strict: o.s === true }, out);
    });

  img
    .command('snapshot')
    .description('list, create, apply or delete internal snapshots')
    .option('-l', 'list snapshots')
    .option('-c <snapshot>', 'create a snapshot')
    .option('-a <snapshot>', 'apply (revert to) a snapshot')
    .option('-d <snapshot>', 'delete a snapshot')
    .option('-f <fmt>', 'image format (probed when absent)')
    .option('-q', 'quiet')
    .option('-U, --force-share', 'accepted for compatibility')
    .argument('<filename>')
    .action(async (filename: string, o: Record<string, unknown>) => {
      const actions: SnapshotAction[] = [];
      if (o.l) actions.push({ kind: 'list' });
      if (o.c !== undefined) actions.push({ kind: 'create', name: o.c as string });
      if (o.a !== undefined) actions.push({ kind: 'apply', name: o.a as string });
      if (o.d !== undefined) actions.push({ kind: 'delete', name: o.d as string });
      if (actions.length !== 1) throw new UsageError('img snapshot: give exactly one of -l, -c NAME, -a NAME, -d NAME');
      await runSnapshot(filename, actions[0]!, parseFormat(o.f as string | undefined), out);
    });

  // The actions run in the order given: each option's event records its place.
  let bitmapActions: BitmapAction[] = [];
  const bitmap = img
    .command('bitmap')
    .description('add, remove, clear, enable, disable or merge persistent dirty bitmaps (actions run in the order given)')
    .option('--add', 'add the bitmap (enabled, unless --disable follows)')
    .option('--remove', 'remove the bitmap')
    .option('--clear', 'clear every bit')
    .option('--enable', 'record writes')
    .option('--disable', 'stop recording writes')
    .option('--merge <source>', 'add the bits of bitmap SOURCE (of this image, or of -b FILE)')
    .option('-g <granularity>', 'granularity of an added bitmap (default: the cluster size, at least 4 KiB)')
    .option('-b <source_file>', 'the image holding the --merge source bitmap')
    .option('-F <source_fmt>', 'its format')
    .option('-f <fmt>', 'image format (probed when absent)')
    .argument('[filename]')
    .argument('[bitmap]')
    .action(async (filename: string | undefined, name: string | undefined, o: Record<string, unknown>) => {
      const actions = bitmapActions;
      bitmapActions = [];
      if (filename === undefined || name === undefined) throw new UsageError('Expecting filename and bitmap name');
      const format = parseFormat(o.f as string | undefined);
      const sourceFormat = parseFormat(o.F as string | undefined);
      await runBitmap({
        file: filename, bitmap: name, actions,
        ...(format ? { format } : {}),
        ...(o.g !== undefined ? { granularity: parseImageSize(o.g as string, 'granularity') } : {}),
        ...(o.b !== undefined ? { sourceFile: o.b as string } : {}),
        ...(sourceFormat ? { sourceFormat } : {}),
      });
    });
  for (const kind of ['add', 'remove', 'clear', 'enable', 'disable'] as const) {
    bitmap.on(`option:${kind}`, () => bitmapActions.push({ kind }));
  }
  bitmap.on('option:merge', (source: string) => bitmapActions.push({ kind: 'merge', source }));

  img
    .command('resize')
    .description('change the virtual size of an image ([+|-]size; shrinking needs --shrink)')
    .option('-f <fmt>', 'image format (probed when absent)')
    .option('--shrink', 'allow shrinking')
    .option('-q', 'quiet')
    .argument('<filename>')
    .argument('<size>', 'new size, or +N / -N relative (use -- before a negative size)')
    .action(async (filename: string, size: string, o: Record<string, unknown>) => {
      const format = parseFormat(o.f as string | undefined);
      await runResize({ file: filename, size, shrink: o.shrink === true, quiet: o.q === true, ...(format ? { format } : {}) }, out);
    });

  img
    .command('convert')
    .description('copy an image (with its backing chain) into a new qcow2 or raw image, or into an existing one (-n)')
    .option('-f <fmt>', 'source format (probed when absent)')
    .option('-O <output_fmt>', 'target format: qcow2 or raw (default raw)')
    .option('-o <options>', 'creation options of the target', collect, [])
    .option('-B <backing_file>', "the target's backing file: only what the source's top image allocates is copied")
    .option('-F <backing_fmt>', 'format of the backing file: qcow2 or raw')
    .option('-c', 'compressed clusters (qcow2 target)')
    .option('-n', 'write into the existing target instead of creating it')
    .addOption(new Option('-t <cache>', 'target cache mode; only unsafe (the default, as in qemu-img) skips the final flush').choices(CACHE_MODES))
    .addOption(new Option('-T <src_cache>', 'source cache mode (accepted for compatibility)').choices(CACHE_MODES))
    .option('-p', 'show progress')
    .option('-q', 'quiet')
    .option('-U, --force-share', 'accepted for compatibility')
    .option('--bitmaps', 'copy the persistent bitmaps too (qcow2 to qcow2)')
    .option('--skip-broken-bitmaps', 'with --bitmaps: leave inconsistent bitmaps out (a warning each)')
    .argument('<filename>')
    .argument('<output_filename>')
    .action(async (src: string, dst: string, o: Record<string, unknown>) => {
      const srcFormat = parseFormat(o.f as string | undefined);
      const backingFormat = parseFormat(o.F as string | undefined);
      await runConvert({
        src,
        dst,
        dstFormat: parseFormat((o.O as string | undefined) ?? 'raw')!,
        dstFormatGiven: o.O !== undefined,
        skipCreate: o.n === true,
        compress: o.c === true,
        ...(o.B !== undefined ? { backingFile: o.B as string } : {}),
        ...(backingFormat ? { backingFormat } : {}),
        options: o.o as string[],
        ...(o.t ? { cache: o.t as CacheMode } : {}),
        ...(srcFormat ? { srcFormat } : {}),
        ...(o.p ? { progress: ctx.progress(`convert ${src}`) } : {}),
        bitmaps: o.bitmaps === true,
        skipBrokenBitmaps: o.skipBrokenBitmaps === true,
        warn: (line) => out.warn(line),
      });
    });

  img
    .command('io')
    .description("run qemu-io commands on an image: -c 'read|write [-P pattern] [-z] off len' -c 'discard off len' …")
    .option('-c, --cmd <command>', 'a qemu-io command (repeatable; run in order)', collect, [])
    .option('-f <fmt>', 'image format (probed when absent)')
    .option('-r, --read-only', 'open the image read-only')
    .argument('<filename>')
    .action(async (filename: string, o: Record<string, unknown>) => {
      const commands = o.cmd as string[];
      if (commands.length === 0) throw new UsageError('img io: give at least one -c COMMAND');
      const format = parseFormat(o.f as string | undefined);
      await runIo({ file: filename, commands, readOnly: o.readOnly === true, ...(format ? { format } : {}) }, out);
    });

  // stream / commit / rebase: the chain jobs, written alongside the jobs in ../jobs/.
  registerChainCommands(img, ctx);

  return img;
}
