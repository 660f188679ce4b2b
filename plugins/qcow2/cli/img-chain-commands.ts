/**
 * `offload img stream|commit|rebase`: the chain jobs on files, with qemu-img 7.2's option letters,
 * messages and semantics (commit empties the top unless -d; -b implies -d; rebase needs -b or -u,
 * and -F with a non-empty -b). The jobs run in this process with a plain JobContext; `-p` shows
 * progress.
 */
import type { Command } from 'commander';
import { FailedPrecondition, InvalidArgument, RateLimiter, UsageError, parseSize, type CliContext, type JobContext } from '../../../core/index.js';
import { commitTask, rebaseTask, streamTask } from '../jobs/index.js';

type Progress = { update(current: number, total: number): void; done(): void };

/** A JobContext for a job run by the CLI itself: progress to the bar, an optional rate limit. */
function cliContext(progress: Progress | undefined, rate: number): JobContext {
  let current = 0;
  let total = 0;
  const limiter = new RateLimiter();
  limiter.setSpeed(rate);
  const show = () => progress?.update(Math.min(current, total), total);
  const ctx: JobContext = {
    jobId: 'cli',
    signal: new AbortController().signal,
    resumeFrom: undefined,
    completeRequested: true,
    setTotal(n) { total = n; show(); },
    advance(n) { current += n; show(); },
    setProgress(c, t) { current = c; if (t !== undefined) total = t; show(); },
    async checkpoint(n) {
      ctx.advance(n);
      const delay = limiter.delayFor(n);
      if (delay > 0) await new Promise((r) => setTimeout(r, delay));
    },
    saveState() {},
    ready() {},
    async waitForComplete() {},
  };
  return ctx;
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
        await streamTask(filename, { base: o.base as string | undefined }).run(cliContext(progress, 0));
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
        await task.run(cliContext(progress, parseRate(o.r as string | undefined)));
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
        await rebaseTask(filename, { backing: backing ?? '', backingFormat, unsafe: o.u === true }).run(cliContext(progress, 0));
      } finally {
        progress?.done();
      }
    });
}
