/** `offload backup VOL --to BACKEND/NAME` (or `VOL=BACKEND/NAME …`, a group), `offload backups BACKEND/NAME`, `offload restore BACKEND/NAME[@bN] --to VOL`. */
import type { Command } from 'commander';
import { UsageError, type CliContext } from '../contribution.js';
import { formatSize } from '../sizes.js';
import { checkDetach, DETACH_HELP, followJob, pairOf, speedOption } from './data-jobs.js';

export function registerBackupCommands(program: Command, ctx: CliContext): void {
  program.command('backup <refs...>')
    .usage('[options] VOL --to BACKEND/NAME | VOL=BACKEND/NAME [VOL=BACKEND/NAME …]')
    .description('take the next point of a volume\'s backup in the backup volume BACKEND/NAME: a full copy the first time, then only what changed since the last point (each point is a snapshot bN of NAME); several VOL=NAME pairs (the disks of one VM): one job, every volume\'s point of one instant, made all or none')
    .option('--to <backend/name>', 'the backup volume (created by the first backup)')
    .option('--speed <bytes-per-second>', 'rate limit (suffixes k, M, G)')
    .option('--detach', DETACH_HELP)
    .action(async (refs: string[], o: { to?: string; speed?: string; detach?: boolean }) => {
      const pairs = refs.some((r) => r.includes('=')) ? refs.map(pairOf).map((p) => ({ source: p.source, to: p.target })) : undefined;
      if (pairs && o.to !== undefined) throw new UsageError('give VOL --to BACKEND/NAME, or VOL=BACKEND/NAME pairs without --to');
      if (!pairs && (refs.length !== 1 || o.to === undefined)) {
        throw new UsageError(refs.length !== 1 ? `backup takes one VOL with --to, or VOL=BACKEND/NAME pairs, got ${refs.length} volumes` : 'backup VOL needs --to BACKEND/NAME');
      }
      const broker = await ctx.broker();
      checkDetach(broker, o.detach);
      const speed = speedOption(o.speed);
      const job = pairs
        ? await broker.backups.startGroup(pairs, speed ? { speed } : {})
        : await broker.backups.start(refs[0]!, { to: o.to!, ...(speed ? { speed } : {}) });
      const what = (pairs ?? [{ source: refs[0]!, to: o.to! }]).map((p) => `${p.source} → ${p.to}`).join(', ');
      await followJob(ctx, job, `backup ${what}`, broker, o.detach);
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
