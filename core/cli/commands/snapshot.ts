import type { Command } from 'commander';
import type { CliContext } from '../contribution.js';
import { formatSize } from '../sizes.js';

export function registerSnapshotCommands(program: Command, ctx: CliContext): void {
  const snapshot = program.command('snapshot').description('create, list, delete and revert to snapshots');

  snapshot.command('create <ref>')
    .description('take a snapshot: backend/volume@snapshot')
    .action(async (ref: string) => {
      const s = await (await ctx.broker()).snapshots.create(ref);
      ctx.print(s, `created ${s.backend}/${s.volume}@${s.name} (${formatSize(s.sizeBytes)})`);
    });

  snapshot.command('list <volume-ref>')
    .description('list the snapshots of a volume')
    .action(async (ref: string) => {
      const list = await (await ctx.broker()).snapshots.list(ref);
      if (ctx.json) return ctx.print(list);
      ctx.table(list.map((s) => ({ ref: `${s.backend}/${s.volume}@${s.name}`, size: formatSize(s.sizeBytes), created: s.createdAt })), ['ref', 'size', 'created']);
    });

  snapshot.command('delete <ref>')
    .description('delete a snapshot (refused while a clone depends on it)')
    .action(async (ref: string) => {
      await (await ctx.broker()).snapshots.delete(ref);
      ctx.print({ deleted: ref }, `deleted ${ref}`);
    });

  snapshot.command('revert <ref>')
    .description('revert a volume to a snapshot: backend/volume@snapshot')
    .action(async (ref: string) => {
      await (await ctx.broker()).snapshots.revert(ref);
      ctx.print({ reverted: ref }, `reverted to ${ref}`);
    });
}
