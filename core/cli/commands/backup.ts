/** `offload backup VOL --to BACKEND/NAME`, `offload backups BACKEND/NAME`, `offload restore BACKEND/NAME[@bN] --to VOL`. */
import type { Command } from 'commander';
import type { CliContext } from '../contribution.js';
import { formatSize } from '../sizes.js';
import { checkDetach, DETACH_HELP, followJob, speedOption } from './data-jobs.js';

export function registerBackupCommands(program: Command, ctx: CliContext): void {
  program.command('backup <ref>')
    .description('take the next point of a volume\'s backup in the backup volume BACKEND/NAME: a full copy the first time, then only what changed since the last point (each point is a snapshot bN of NAME)')
    .requiredOption('--to <backend/name>', 'the backup volume (created by the first backup)')
    .option('--speed <bytes-per-second>', 'rate limit (suffixes k, M, G)')
    .option('--detach', DETACH_HELP)
    .action(async (ref: string, o: { to: string; speed?: string; detach?: boolean }) => {
      const broker = await ctx.broker();
      checkDetach(broker, o.detach);
      const speed = speedOption(o.speed);
      const job = await broker.backups.start(ref, { to: o.to, ...(speed ? { speed } : {}) });
      await followJob(ctx, job, `backup ${ref} → ${o.to}`, broker, o.detach);
    });

  program.command('backups <backend/name>')
    .description('list the points of a backup volume, oldest first')
    .action(async (target: string) => {
      const points = await (await ctx.broker()).backups.list(target);
      if (ctx.json) return ctx.print(points);
      ctx.table(points.map((p) => ({ point: p.ref, size: formatSize(p.sizeBytes), created: p.createdAt })), ['point', 'size', 'created']);
    });

  program.command('restore <point>')
    .description('copy a backup point (BACKEND/NAME@bN, or BACKEND/NAME for the latest) into a volume: created when missing, overwritten otherwise')
    .requiredOption('--to <ref>', 'the volume to restore into')
    .option('--speed <bytes-per-second>', 'rate limit (suffixes k, M, G)')
    .option('--detach', DETACH_HELP)
    .action(async (point: string, o: { to: string; speed?: string; detach?: boolean }) => {
      const broker = await ctx.broker();
      checkDetach(broker, o.detach);
      const speed = speedOption(o.speed);
      const job = await broker.backups.restore(point, { to: o.to, ...(speed ? { speed } : {}) });
      await followJob(ctx, job, `restore ${point} → ${o.to}`, broker, o.detach);
    });
}
