import type { Command } from 'commander';
import type { Volume } from '../../model/types.js';
import type { CliContext } from '../contribution.js';
import { formatSize, parseSize } from '../sizes.js';
import { registerVolumeFileCommands } from './volume-files.js';

export function volumeRow(v: Volume): Record<string, unknown> {
  return { ref: `${v.backend}/${v.name}`, size: formatSize(v.sizeBytes), bytes: v.sizeBytes, parent: v.parent, owner: v.owner, created: v.createdAt };
}

function showVolume(ctx: CliContext, v: Volume): void {
  ctx.print(v, () => Object.entries(volumeRow(v)).filter(([, x]) => x !== undefined).map(([k, x]) => `${k}: ${String(x)}`));
}

export function registerVolumeCommands(program: Command, ctx: CliContext): void {
  const volume = program.command('volume').description('create, list, show, resize and delete volumes; export them to image files and import them');

  volume.command('create <ref> <size>')
    .description('create a volume (size in bytes, or with a suffix k, M, G, T)')
    .option('--owner <principal>', 'the tenant that owns the volume')
    .action(async (ref: string, size: string, o: { owner?: string }) => {
      const broker = await ctx.broker();
      showVolume(ctx, await broker.volumes.create(ref, { sizeBytes: parseSize(size), ...(o.owner ? { owner: o.owner } : {}) }));
    });

  volume.command('list <backend>')
    .description('list the volumes of a backend')
    .action(async (backend: string) => {
      const broker = await ctx.broker();
      const all = await broker.volumes.listAll(backend);
      if (ctx.json) return ctx.print(all);
      ctx.table(all.map(volumeRow), ['ref', 'size', 'parent', 'owner', 'created']);
    });

  volume.command('show <ref>')
    .description('show one volume')
    .action(async (ref: string) => showVolume(ctx, await (await ctx.broker()).volumes.get(ref)));

  volume.command('resize <ref> <size>')
    .description('grow a volume (shrinking is refused)')
    .action(async (ref: string, size: string) => showVolume(ctx, await (await ctx.broker()).volumes.resize(ref, parseSize(size))));

  volume.command('changes <ref>')
    .description('the ranges of a volume (or of its snapshot vol@s2) that changed since one of its snapshots (data.dirty)')
    .requiredOption('--since <snapshot>', 'the earlier snapshot')
    .action(async (ref: string, o: { since: string }) => {
      const c = await (await ctx.broker()).volumes.changes(ref, { since: o.since });
      const bytes = c.extents.reduce((n, e) => n + e.length, 0);
      ctx.print(c, () => [
        `${ref} since ${o.since}: ${formatSize(bytes)} changed in ${c.extents.length} range${c.extents.length === 1 ? '' : 's'} (granularity ${formatSize(c.granularity)}, size ${formatSize(c.sizeBytes)})`,
        ...c.extents.map((e) => `${String(e.offset).padStart(14)}  ${String(e.length).padStart(12)}`),
      ]);
    });

  volume.command('delete <ref>')
    .description('delete a volume (refused while others depend on it)')
    .action(async (ref: string) => {
      await (await ctx.broker()).volumes.delete(ref);
      ctx.print({ deleted: ref }, `deleted ${ref}`);
    });

  registerVolumeFileCommands(volume, ctx);
}
