import type { Command } from 'commander';
import type { JobInfo } from '../../jobs/job.js';
import type { CliContext } from '../contribution.js';
import { formatSize, parseSize } from '../sizes.js';
import { checkDetach, DETACH_HELP, followJob } from './data-jobs.js';

function row(j: JobInfo): Record<string, unknown> {
  const pct = j.progress.total > 0 ? `${Math.floor((j.progress.current / j.progress.total) * 100)}%` : '-';
  return {
    id: j.id, type: j.type, status: j.orphaned ? 'orphaned' : j.status, ref: j.ref, executor: j.executor,
    progress: `${formatSize(j.progress.current)}/${formatSize(j.progress.total)} ${pct}`, owner: j.owner,
    runner: j.runner && j.status !== 'concluded' ? `${j.runner.host} pid ${j.runner.pid}, seen ${ago(j.runner.seenAt)}` : undefined,
    error: j.error ? `${j.error.code}: ${j.error.message}` : undefined,
  };
}

/** A live job's switch-over record, as `jobs show` says it: which volume holds the data, and why. */
function authoritative(j: JobInfo): string | undefined {
  const a = j.authoritative;
  if (!a) return undefined;
  return a.side === 'target'
    ? `${a.ref} (the target: the switch-over was recorded; ${String(j.params.source)} is no longer current)`
    : `${a.ref} (the source: no switch-over has been recorded${j.status === 'concluded' ? '' : ' yet'})`;
}

/** A live copy cancelled after ready (or suspended): the command that resumes it with only the changes. */
function resumeLine(j: JobInfo): string | undefined {
  if (j.resumedBy) return `resumed as job ${j.resumedBy}`;
  if (j.suspended) return `suspended when its service stopped: the service resumes it when it starts again (or: offload copy --live --resume ${j.id})`;
  if (j.crashed) return `its service died while it copied: the service resumes it from its write-intent record when it serves the source again`;
  const pairs = (j.params.pairs as { source: string; target: string }[] | undefined) ?? [];
  const parts = (j.resumeSince ?? []).flatMap((since, i) => (since && pairs[i] ? [`offload copy --live ${pairs[i]!.source} ${pairs[i]!.target} --since ${since}`] : []));
  return parts.length > 0 ? parts.join('; ') : undefined;
}

function ago(iso: string): string {
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  return s < 120 ? `${s} s ago` : s < 7200 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
}

export function registerJobsCommands(program: Command, ctx: CliContext): void {
  const jobs = program.command('jobs').description('list and control jobs');

  jobs.command('list')
    .description('list jobs (all that are stored, running or concluded)')
    .option('--status <status>', 'only jobs in this status')
    .action(async (o: { status?: string }) => {
      const list = await (await ctx.broker()).jobs.list(o.status ? { status: o.status } : undefined);
      if (ctx.json) return ctx.print(list);
      ctx.table(list.map(row), ['id', 'type', 'status', 'ref', 'executor', 'progress', 'runner', 'error']);
    });

  jobs.command('show <id>')
    .description('show one job')
    .action(async (id: string) => {
      const info = (await (await ctx.broker()).jobs.get(id)).info();
      ctx.print(info, () => Object.entries({ ...row(info), data: authoritative(info), resume: resumeLine(info) }).filter(([, v]) => v !== undefined).map(([k, v]) => `${k}: ${String(v)}`));
    });

  const verb = (name: 'cancel' | 'pause' | 'resume' | 'complete' | 'dismiss', description: string) =>
    jobs.command(`${name} <id>`).description(description).action(async (id: string) => {
      await (await ctx.broker()).jobs[name](id);
      ctx.print({ id, requested: name }, `${name}: requested for job ${id}`);
    });
  jobs.command('cancel <id>')
    .description('cancel a job (the chain stays valid); an orphaned one is taken over to be cancelled here')
    .action(async (id: string) => {
      const broker = await ctx.broker();
      if (!(await broker.jobs.get(id)).info().orphaned) {
        await broker.jobs.cancel(id);
        return ctx.print({ id, requested: 'cancel' }, `cancel: requested for job ${id}`);
      }
      // Its task cleans up as on any cancel (a clone removes its new volume): run it here to do so.
      const job = await broker.jobs.takeOver(id);
      if (job.info().status !== 'concluded') await job.cancel();
      const info = await job.wait();
      ctx.print(info, `job ${id}: taken over and ${info.error?.code === 'Cancelled' ? 'cancelled' : info.error ? `ended: ${info.error.message}` : 'concluded before the cancel'}`);
    });
  verb('pause', 'pause a running job');

  jobs.command('resume <id>')
    .description('resume a paused job; or take over an orphaned one (its runner stopped) and run it here (with --server: in the service) to its end')
    .option('--detach', DETACH_HELP)
    .action(async (id: string, o: { detach?: boolean }) => {
      const broker = await ctx.broker();
      checkDetach(broker, o.detach);
      const info = (await broker.jobs.get(id)).info();
      if (!info.orphaned) {
        await broker.jobs.resume(id);
        return ctx.print({ id, requested: 'resume' }, `resume: requested for job ${id}`);
      }
      ctx.note(`job ${id} is orphaned (${info.runner ? `last run by ${info.runner.host} pid ${info.runner.pid}, seen ${ago(info.runner.seenAt)}` : 'no runner'}): taking it over`);
      await followJob(ctx, await broker.jobs.takeOver(id), `${info.type} ${info.ref}`, broker, o.detach);
    });
  verb('complete', 'switch over a job that is ready (active commit, live copy)');
  verb('dismiss', 'forget a concluded job');

  jobs.command('set-speed <id> <bytes-per-second>')
    .description('change a job\'s speed limit (0 = unlimited)')
    .action(async (id: string, speed: string) => {
      await (await ctx.broker()).jobs.setSpeed(id, parseSize(speed, 'speed'));
      ctx.print({ id, speed: parseSize(speed, 'speed') }, `speed of job ${id} set to ${speed}/s`);
    });

  jobs.command('wait <id>')
    .description('wait for a job to conclude')
    .action(async (id: string) => {
      const info = await (await ctx.broker()).jobs.wait(id);
      ctx.print(info, `job ${id}: ${info.error ? `failed: ${info.error.code}: ${info.error.message}` : 'concluded'}`);
      if (info.error) ctx.setExitCode(1);
    });
}
