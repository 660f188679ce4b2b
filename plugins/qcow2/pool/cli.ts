/** `offload pool check BACKEND [--repair]`: the local pool's metadata against its files. */
import type { Command } from 'commander';
import { commandGroup, InvalidArgument, type CliContext, type CliContribution } from '../../../core/index.js';
import { Qcow2Pool } from './pool-backend.js';

export const poolCliContribution: CliContribution = {
  register(program: Command, ctx: CliContext): void {
    commandGroup(program, 'pool', 'maintain local qcow2 pools')
      .command('check <backend>')
      .description('compare a qcow2 pool\'s metadata with its files: interrupted creates and deletes, damaged or missing files, leaks, files that are not ours')
      .option('--repair', 'finish interrupted creates and deletes, reclaim leaks, record finished streams (never deletes a file the pool does not own)')
      .action(async (name: string, o: { repair?: boolean }) => {
        const broker = await ctx.broker();
        const backend = broker.backend(name);
        if (!(backend instanceof Qcow2Pool)) {
          throw new InvalidArgument(`pool check ${name}: backend ${name} is of kind ${backend.kind}; pool check works on qcow2 pools`, { ref: name, hint: 'see `offload backends`' });
        }
        const report = await backend.check({ repair: o.repair ?? false });
        ctx.print(report, () => {
          const lines = [`pool ${report.backend} (${report.path}): ${report.volumes} volumes, ${report.layers} layer files`];
          for (const i of report.issues) lines.push(`${i.repaired ? 'repaired' : i.severity}: ${i.message}`);
          const open = report.issues.filter((i) => i.severity === 'repairable' && !i.repaired).length;
          if (report.issues.length === 0) lines.push('no problems found');
          else if (open > 0) lines.push(`${open} problem(s) can be repaired with --repair`);
          return lines;
        });
        if (!report.clean) ctx.setExitCode(1);
      });
  },
};
