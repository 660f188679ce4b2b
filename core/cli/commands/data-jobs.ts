import type { Command } from 'commander';
import type { Job, JobInfo } from '../../jobs/job.js';
import { errorFromCode } from '../../model/errors.js';
import { UsageError, type CliContext } from '../contribution.js';
import { formatSize, parseSize } from '../sizes.js';
import { preferOption } from './plan.js';

/** Wait for a job with a progress bar on a TTY; fails with the job's error. */
export async function awaitJob(ctx: CliContext, job: Job, label: string): Promise<JobInfo> {
  const bar = ctx.progress(label);
  const off = job.on((e) => bar.update(e.job.progress.current, e.job.progress.total));
  const info = await job.wait();
  off();
  bar.done();
  if (info.error) throw errorFromCode(info.error.code, info.error.message, { ref: info.ref, data: { job: info.id } });
  return info;
}

/** Follow a job to its end: a progress bar on a TTY, one final line otherwise; fails with the job's error. */
export async function followJob(ctx: CliContext, job: Job, label: string): Promise<void> {
  const info = await awaitJob(ctx, job, label);
  ctx.print(info, `${label}: done (job ${info.id}, ${info.executor}, ${formatSize(info.progress.current)} processed)`);
}

function speedOption(s: string | undefined): number | undefined {
  return s === undefined ? undefined : parseSize(s, 'speed');
}

export function registerDataJobCommands(program: Command, ctx: CliContext): void {
  program.command('clone <source> <target>')
    .description('clone a volume or snapshot (backend/volume[@snapshot]) into a new volume: natively, or through the host as a job')
    .option('--full', 'an independent copy')
    .option('--linked', 'share unchanged data with the source')
    .option('--size <size>', 'size of the new volume (≥ the source)')
    .option('--prefer <where>', 'host: copy through the host even where the backend could clone natively')
    .option('--verify', 'through the host: compare checksums of source and target after the copy')
    .option('--speed <bytes-per-second>', 'through the host: rate limit (suffixes k, M, G)')
    .action(async (source: string, target: string, o: { full?: boolean; linked?: boolean; size?: string; prefer?: string; verify?: boolean; speed?: string }) => {
      if (o.full && o.linked) throw new UsageError('--full and --linked exclude each other');
      const mode = o.full ? 'full' : o.linked ? 'linked' : undefined;
      const speed = speedOption(o.speed);
      const broker = await ctx.broker();
      const started = await broker.startClone(source, target, {
        ...(mode ? { mode } : {}), ...(o.size ? { sizeBytes: parseSize(o.size) } : {}), ...(o.prefer ? { prefer: preferOption(o.prefer) } : {}),
        ...(o.verify ? { verify: true } : {}), ...(speed ? { speed } : {}),
      });
      if (started.job) {
        const info = await awaitJob(ctx, started.job, `clone ${source} → ${target}`);
        const v = await broker.volumes.get(target);
        ctx.print({ ...v, job: info }, `cloned ${source} to ${v.backend}/${v.name} through the host (job ${info.id}, ${formatSize(info.progress.current)} copied)`);
        return;
      }
      const v = started.volume;
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
    .description('copy a volume\'s data into another existing volume, on any backends, through the host')
    .option('--speed <bytes-per-second>', 'rate limit (suffixes k, M, G)')
    .option('--verify', 'compare checksums of source and target after the copy')
    .option('--prefer <where>', 'host (the only way a copy runs; accepted for symmetry with clone)')
    .action(async (source: string, target: string, o: { speed?: string; verify?: boolean; prefer?: string }) => {
      const speed = speedOption(o.speed);
      const job = await (await ctx.broker()).copy(source, target, {
        ...(speed ? { speed } : {}), ...(o.verify ? { verify: true } : {}), ...(o.prefer ? { prefer: preferOption(o.prefer) } : {}),
      });
      await followJob(ctx, job, `copy ${source} → ${target}`);
    });
}
