import type { Command } from 'commander';
import type { CliContext } from '../contribution.js';

export function registerLocksCommands(program: Command, ctx: CliContext): void {
  const locks = program.command('locks').description('volume locks: list, and maintenance locks (administrators)');

  locks.command('list')
    .description('locks held now (by jobs of any process, and maintenance locks)')
    .action(async () => {
      const list = await (await ctx.broker()).locks.list();
      if (ctx.json) return ctx.print(list);
      ctx.table(list.map((l) => ({ volume: l.key, mode: l.mode, holder: l.holder.id, principal: l.holder.principal, what: l.holder.description })), ['volume', 'mode', 'holder', 'principal', 'what']);
    });

  locks.command('maintenance <ref>')
    .description('place a maintenance lock: tenants cannot act on the volume until it is released')
    .requiredOption('--reason <text>', 'why (shown to whoever is refused)')
    .action(async (ref: string, o: { reason: string }) => {
      await (await ctx.broker()).locks.maintenance(ref, o.reason);
      ctx.print({ locked: ref, reason: o.reason }, `maintenance lock placed on ${ref}`);
    });

  locks.command('release <ref>')
    .description('remove a maintenance lock')
    .action(async (ref: string) => {
      await (await ctx.broker()).locks.release(ref);
      ctx.print({ released: ref }, `maintenance lock on ${ref} released`);
    });
}
