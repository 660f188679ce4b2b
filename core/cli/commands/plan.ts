import { resolve } from 'node:path';
import type { Command } from 'commander';
import type { Operation } from '../../planner/plan.js';
import { UsageError, type CliContext } from '../contribution.js';
import { parseSize } from '../sizes.js';

const USAGE = 'plan create REF SIZE | clone SRC DST [--full|--linked] [--prefer host] | stream REF | commit REF | copy SRC DST | snapshot REF@S | revert REF@S | delete REF | resize REF SIZE | export REF FILE | import FILE REF [--create]';

function toOperation(words: string[], o: PlanFlags): Operation {
  const [op, a, b] = words;
  const need = (n: number) => {
    if (words.length !== n + 1) throw new UsageError(`plan ${op} takes ${n} argument${n > 1 ? 's' : ''}; usage: ${USAGE}`);
  };
  switch (op) {
    case 'create': need(2); return { op, ref: a!, sizeBytes: parseSize(b!) };
    case 'resize': need(2); return { op, ref: a!, sizeBytes: parseSize(b!) };
    case 'clone': need(2); return { op, source: a!, target: b!, ...(o.full ? { mode: 'full' as const } : o.linked ? { mode: 'linked' as const } : {}), ...(o.prefer ? { prefer: preferOption(o.prefer) } : {}) };
    case 'copy': need(2); return { op, source: a!, target: b! };
    case 'stream': case 'commit': need(1); return { op, ref: a!, ...(o.base ? { base: o.base } : {}) };
    case 'snapshot': case 'revert': case 'delete': need(1); return { op, ref: a! };
    case 'export': need(2); return { op, source: a!, file: resolve(b!) };
    case 'import': need(2); return { op, file: resolve(a!), target: b!, ...(o.create ? { create: true } : {}) };
    default: throw new UsageError(`unknown operation "${op ?? ''}"; usage: ${USAGE}`);
  }
}

interface PlanFlags { full?: boolean; linked?: boolean; base?: string; prefer?: string; create?: boolean }

/** `--prefer host|native`. */
export function preferOption(p: string): 'host' | 'native' {
  if (p !== 'host' && p !== 'native') throw new UsageError(`--prefer takes host or native, got ${JSON.stringify(p)}`);
  return p;
}

export function registerPlanCommand(program: Command, ctx: CliContext): void {
  program.command('plan <operation...>')
    .description(`explain where an operation would run, without running it: ${USAGE}`)
    .option('--full', 'clone: an independent copy')
    .option('--linked', 'clone: share data with the source')
    .option('--base <name>', 'stream/commit: the base')
    .option('--prefer <where>', 'clone: host = through the host even where the backend could clone natively')
    .option('--create', 'import: the volume is created with the file\'s size')
    .action(async (words: string[], o: PlanFlags) => {
      const plan = await (await ctx.broker()).plan(toOperation(words, o));
      ctx.print(plan, () => [
        `${plan.supported ? 'plan' : 'unsupported'}: ${plan.reason}`,
        ...plan.steps.map((s, i) => `  ${i + 1}. ${s.action} on ${s.executor}${s.hostBytes !== undefined ? ` (${s.hostBytes} bytes through the host)` : s.executor === 'host' ? ' (the allocated data passes through the host)' : ''}: ${s.reason}`),
      ]);
      if (!plan.supported) ctx.setExitCode(1);
    });
}
