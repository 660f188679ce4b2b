import type { Command } from 'commander';
import type { Job } from '../../jobs/job.js';
import { errorFromCode } from '../../model/errors.js';
import { UsageError, type CliContext } from '../contribution.js';
import { formatSize, parseSize } from '../sizes.js';

/** Follow a job to its end: a progress bar on a TTY, one final line otherwise; fails with the job's error. */
export async function followJob(ctx: CliContext, job: Job, label: string): Promise<void> {
  const bar = ctx.progress(label);
  const off = job.on((e) => bar.update(e.job.progress.current, e.job.progress.total));
  const info = await job.wait();
  off();
  bar.done();
  if (info.error) throw errorFromCode(info.error.code, info.error.message, { ref: info.ref, data: { job: info.id } });
  ctx.print(info, `${label}: done (job ${info.id}, ${info.executor}, ${formatSize(info.progress.current)} processed)`);
}

function speedOption(s: string | undefined): number | undefined {
  return s === undefined ? undefined : parseSize(s, 'speed');
}

export function registerDataJobCommands(program: Command, ctx: CliContext): void {
  program.command('clone <source> <target>')
    .description('clone a volume or snapshot (backend/volume[@snapshot]) into a new volume')
    .option('--full', 'an independent copy')
    .option('--linked', 'share unchanged data with the source')
    .option('--size <size>', 'size of the new volume (≥ the source)')
    .action(async (source: string, target: string, o: { full?: boolean; linked?: boolean; size?: string }) => {
      if (o.full && o.linked) throw new UsageError('--full and --linked exclude each other');
      const mode = o.full ? 'full' : o.linked ? 'linked' : undefined;
      const v = await (await ctx.broker()).clone(source, target, { ...(mode ? { mode } : {}), ...(o.size ? { sizeBytes: parseSize(o.size) } : {}) });
      ctx.print(v, `cloned ${source} to ${v.backend}/${v.name}${v.parent ? ` (linked to ${v.parent})` : ''}`);
    });

  const chainJobs = [
    { verb: 'stream', about: 'make a volume independent of its parent (or of everything above --base)', base: 'stop at this ancestor' },
    { verb: 'commit', about: 'merge a volume\'s changes into its parent (or --base)', base: 'commit into this ancestor' },
  ] as const;
  for (const { verb, about, base } of chainJobs) {
    program.command(`${verb} <ref>`)
      .description(about)
      .option('--base <name>', base)
      .option('--speed <bytes-per-second>', 'rate limit (suffixes k, M, G)')
      .action(async (ref: string, o: { base?: string; speed?: string }) => {
        const speed = speedOption(o.speed);
        const job = await (await ctx.broker())[verb](ref, { ...(o.base ? { base: o.base } : {}), ...(speed ? { speed } : {}) });
        await followJob(ctx, job, `${verb} ${ref}`);
      });
  }

  program.command('copy <source> <target>')
    .description('copy a volume\'s data into another volume, on any backends (through the host when needed)')
    .option('--speed <bytes-per-second>', 'rate limit (suffixes k, M, G)')
    .action(async (source: string, target: string, o: { speed?: string }) => {
      const speed = speedOption(o.speed);
      const job = await (await ctx.broker()).copy(source, target, speed ? { speed } : {});
      await followJob(ctx, job, `copy ${source} → ${target}`);
    });
}
