/**
 * `offload img stream|commit|rebase`: the chain jobs on files, with qemu-img 7.2's option letters,
 * messages and semantics (commit empties the top unless -d; -b implies -d; rebase needs -b or -u,
 * and -F with a non-empty -b). The jobs run in this process (a core JobRun); `-p` shows
 * progress.
 */
import type { Command } from 'commander';
import { FailedPrecondition, InvalidArgument, JobRun, UsageError, parseSize, type CliContext } from '../../../core/index.js';
import { commitTask, rebaseTask, streamTask } from '../jobs/index.js';

type Progress = { update(current: number, total: number): void; done(): void };

/** The run of a job the CLI runs itself: progress to the bar, an optional rate limit. */
function cliRun(progress: Progress | undefined, rate: number): JobRun {
  return new JobRun({ jobId: 'cli', speed: rate, onProgress: (current, total) => progress?.update(Math.min(current, total), total) });
}

function parseRate(rate: string | undefined): number {
  if (rate === undefined) return 0;
  try {
    return parseSize(rate);
  } catch {
    throw new UsageError(`Invalid rate limit specified: ${rate}`);
  }
}

function checkFormat(fmt: string | undefined): string | undefined {
  if (fmt !== undefined && fmt !== 'qcow2' && fmt !== 'raw') {
    throw new InvalidArgument(`Unknown file format '${fmt}'`, { hint: 'use qcow2 or raw' });
  }
  return fmt;
}

export function registerChainCommands(img: Command, ctx: CliContext): void {
  img
    .command('stream')
    .description('copy the data of the backing chain (down to --base) into the image, then drop those backing files')
    .option('--base <base>', 'keep this backing file (and those below it); default: flatten the whole chain')
    .option('-p', 'show progress')
    .option('-q', 'quiet')
    .argument('<filename>')
    .action(async (filename: string, o: Record<string, unknown>) => {
      const progress = o.p ? ctx.progress(`stream ${filename}`) : undefined;
      try {
        await streamTask(filename, { base: o.base as string | undefined }).run(cliRun(progress, 0));
      } finally {
        progress?.done();
      }
      if (!o.q) ctx.print({ streamed: filename }, 'Image streamed.');
    });

  img
    .command('commit')
    .description('write the image\'s changes into its backing file (then empty it, unless -d or -b)')
    .option('-b <base>', 'commit down to this backing file (implies -d)')
    .option('-d', 'do not empty the image after committing')
    .option('-f <fmt>', 'image format (qcow2)')
    .option('-r <rate>', 'rate limit in bytes per second (k, M, G suffixes)')
    .option('-p', 'show progress')
    .option('-q', 'quiet')
    .argument('<filename>')
    .action(async (filename: string, o: Record<string, unknown>) => {
      checkFormat(o.f as string | undefined);
      const base = o.b as string | undefined;
      const progress = o.p ? ctx.progress(`commit ${filename}`) : undefined;
      try {
        const task = commitTask(filename, { base, empty: o.d !== true && base === undefined });
        await task.run(cliRun(progress, parseRate(o.r as string | undefined)));
      } finally {
        progress?.done();
      }
      if (!o.q) ctx.print({ committed: filename }, 'Image committed.');
    });

  img
    .command('rebase')
    .description('change the backing file (safe: copy what differs first; -u: header only; -b "" flattens)')
    .option('-b <backing_file>', 'new backing file ("" for none)')
    .option('-F <backing_fmt>', 'format of the new backing file: qcow2 or raw')
    .option('-f <fmt>', 'image format (qcow2)')
    .option('-u', 'unsafe: rewrite the header only')
    .option('-p', 'show progress')
    .option('-q', 'quiet')
    .argument('<filename>')
    .action(async (filename: string, o: Record<string, unknown>) => {
      checkFormat(o.f as string | undefined);
      const backing = o.b as string | undefined;
      const backingFormat = checkFormat(o.F as string | undefined);
      if (backing === undefined && !o.u) throw new UsageError('Must specify backing file (-b) or use unsafe mode (-u)');
      if (backing !== undefined && backing !== '' && backingFormat === undefined) {
        throw new FailedPrecondition(`Could not change the backing file to '${backing}': backing format must be specified`, {
          ref: filename, hint: 'add -F qcow2 or -F raw',
        });
      }
      const progress = o.p ? ctx.progress(`rebase ${filename}`) : undefined;
      try {
        await rebaseTask(filename, { backing: backing ?? '', backingFormat, unsafe: o.u === true }).run(cliRun(progress, 0));
      } finally {
        progress?.done();
      }
    });
}
