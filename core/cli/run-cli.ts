import type { ContainerModule } from 'inversify';
import type { LoadedPlugins } from '../backend/plugin-container.js';
import type { CliContribution } from './contribution.js';
import { runCommandLine } from './command-line.js';
import type { OutputStreams } from './output.js';
import { registerBrokerCommands } from './commands/index.js';

export interface RunCliOptions {
  /** Plugin modules: their CLI contributions are added, and the broker (when a command opens one) uses them. */
  plugins: readonly ContainerModule[];
  /**
   * Contributions given directly, without loading plugin modules: bin/main.ts starts `offload img`
   * this way, so a qemu-img–style call does not pay for inversify, the config schemas and SQLite.
   */
  contributions?: readonly CliContribution[];
  io?: OutputStreams;
  env?: NodeJS.ProcessEnv;
  /**
   * Exit code for bad usage (default 2). `offload img` uses 1, as qemu-img does: there 2 means
   * "corruptions found" to a script that runs `img check`.
   */
  usageExitCode?: number;
}

/**
 * Run the command line — the broker verbs (`backends`, `volume`, `jobs`, …) and the plugins'
 * commands — and return the exit code: 0 success, 1 the operation failed, 2 bad usage (including
 * a broken config; see usageExitCode). Errors are one line, without a stack trace.
 */
export async function runCli(argv: string[], opts: RunCliOptions): Promise<number> {
  const env = opts.env ?? process.env;
  // The plugins are loaded once: their commands are registered, and a broker a command opens uses them.
  let loaded: LoadedPlugins | undefined;
  return runCommandLine(argv, {
    io: opts.io,
    env,
    usageExitCode: opts.usageExitCode,
    openBroker: async (file) => {
      const { createBroker } = await import('../broker.js');
      // A command never adopts another runner's job (it would run it only while the command
      // lives): `offload jobs resume ID` takes one over explicitly.
      return createBroker(file, { plugins: loaded ?? opts.plugins, env, recoverJobs: false });
    },
    register: async (program, ctx) => {
      registerBrokerCommands(program, ctx);
      const contributions = [...(opts.contributions ?? [])];
      if (opts.plugins.length > 0) {
        const { loadPlugins } = await import('../backend/plugin-container.js');
        loaded = await loadPlugins(opts.plugins);
        contributions.push(...loaded.contributions);
      }
      for (const c of contributions) c.register(program, ctx);
    },
  });
}
