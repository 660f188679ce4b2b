import type { Command } from 'commander';
import type { CliContext } from '../contribution.js';

export function registerBackendsCommand(program: Command, ctx: CliContext): void {
  program
    .command('backends')
    .description('list the configured backends and their capabilities')
    .action(async () => {
      const broker = await ctx.broker();
      const list = await broker.backends();
      if (ctx.json) {
        ctx.print(list.map((b) => ({ name: b.name, kind: b.kind, capabilities: b.capabilities.toJSON() })));
        return;
      }
      ctx.table(list.map((b) => ({ name: b.name, kind: b.kind, capabilities: b.capabilities.names().join(' ') })), ['name', 'kind', 'capabilities']);
    });
}
