import type { Command } from 'commander';
import type { JobInfo } from '../../jobs/job.js';
import type { CliContext } from '../contribution.js';
import { formatSize, parseSize } from '../sizes.js';

function row(j: JobInfo): Record<string, unknown> {
  const pct = j.progress.total > 0 ? `${Math.floor((j.progress.current / j.progress.total) * 100)}%` : '-';
  return {
    id: j.id, type: j.type, status: j.status, ref: j.ref, executor: j.executor, progress: `${formatSize(j.progress.current)}/${formatSize(j.progress.total)} ${pct}`,
    owner: j.owner, error: j.error ? `${j.error.code}: ${j.error.message}` : undefined,
  };
}

export function registerJobsCommands(program: Command, ctx: CliContext): void {
  const jobs = program.command('jobs').description('list and control jobs');

  jobs.command('list')
    .description('list jobs (all that are stored, running or concluded)')
    .option('--status <status>', 'only jobs in this status')
    .action(async (o: { status?: string }) => {
      const list = (await ctx.broker()).jobs.list(o.status ? { status: o.status } : undefined);
      if (ctx.json) return ctx.print(list);
      ctx.table(list.map(row), ['id', 'type', 'status', 'ref', 'executor', 'progress', 'error']);
    });

  jobs.command('show <id>')
    .description('show one job')
    .action(async (id: string) => {
      const info = (await ctx.broker()).jobs.get(id).info();
      ctx.print(info, () => Object.entries(row(info)).filter(([, v]) => v !== undefined).map(([k, v]) => `${k}: ${String(v)}`));
    });

  const verb = (name: 'cancel' | 'pause' | 'resume' | 'complete' | 'dismiss', description: string) =>
    jobs.command(`${name} <id>`).description(description).action(async (id: string) => {
      (await ctx.broker()).jobs[name](id);
      ctx.print({ id, requested: name }, `${name}: requested for job ${id}`);
    });
  verb('cancel', 'cancel a job (the chain stays valid)');
  verb('pause', 'pause a running job');
  verb('resume', 'resume a paused job');
  verb('complete', 'switch over a job that is ready (active commit, live copy)');
  verb('dismiss', 'forget a concluded job');

  jobs.command('set-speed <id> <bytes-per-second>')
    .description('change a job\'s speed limit (0 = unlimited)')
    .action(async (id: string, speed: string) => {
      (await ctx.broker()).jobs.setSpeed(id, parseSize(speed, 'speed'));
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
