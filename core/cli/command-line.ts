/**
 * The `offload` program without any command of its own: global options, the CliContext, error
 * reporting and exit codes. `runCli` (run-cli.ts) adds the broker verbs and the plugins' commands;
 * `offload img` (bin/img.ts) runs it with the qcow2 commands alone. This module imports neither
 * the broker nor its commands, so that the `offload img` bundle holds (and starts) neither.
 */
import { Command, CommanderError } from 'commander';
import type { Broker } from '../broker-api.js';
import { isConfigError } from '../config/config-error.js';
import { secrets } from '../config/secrets.js';
import { OffloadError } from '../model/errors.js';
import { UsageError, type CliContext } from './contribution.js';
import { Output, type OutputStreams } from './output.js';

export interface CommandLineOptions {
  /** Add the commands to the program (before argv is parsed). */
  register(program: Command, ctx: CliContext): void | Promise<void>;
  /**
   * Open the broker a command asks for (`ctx.broker()`), from the config file named by `--config`,
   * $OFFLOAD_CONFIG or ./offload.yaml — or, given the address of a service (`--server`,
   * $OFFLOAD_SERVER), its client; it is closed when the command ends. Without it, `ctx.broker()`
   * rejects: the commands registered do not use a broker.
   */
  openBroker?: (configFile: string, server: string | undefined) => Promise<Broker>;
  io?: OutputStreams;
  env?: NodeJS.ProcessEnv;
  /** Exit code for bad usage (default 2); see RunCliOptions.usageExitCode. */
  usageExitCode?: number;
}

/**
 * Run the command line and return the exit code: 0 success, 1 the operation failed, 2 bad usage
 * (including a broken config; see usageExitCode). Errors are one line, without a stack trace.
 */
export async function runCommandLine(argv: string[], opts: CommandLineOptions): Promise<number> {
  // Looked up when written to: Node creates process.stdout on first use, which costs a command
  // that prints nothing (`img convert`) a few milliseconds.
  const io: OutputStreams = opts.io ?? { get stdout() { return process.stdout; }, get stderr() { return process.stderr; } };
  const env = opts.env ?? process.env;
  const json = argv.includes('--json');
  const out = new Output(io, json);
  let exitCode = 0;
  let broker: Broker | undefined;
  let brokerPromise: Promise<Broker> | undefined;

  const program = new Command('offload')
    .description('Offload Broker: volumes, snapshots, clones and chain jobs, run where the data is')
    .option('--config <file>', 'config file (default ./offload.yaml, or $OFFLOAD_CONFIG)')
    .option('--json', 'print results as JSON')
    .option('--server <address>', 'send the commands to a service (`offload serve`): unix:PATH, http://HOST:PORT or https://HOST:PORT (default $OFFLOAD_SERVER, or server: in the config; $OFFLOAD_TOKEN, $OFFLOAD_CA)')
    .showHelpAfterError(false)
    .exitOverride()
    .configureOutput({
      writeOut: (s) => io.stdout.write(s),
      writeErr: (s) => io.stderr.write(s),
      outputError: () => undefined, // printed below, once, in our format
    });

  const ctx: CliContext = {
    json,
    broker: () => {
      brokerPromise ??= (async () => {
        if (!opts.openBroker) throw new Error('this command line has no broker');
        const server = (program.opts().server as string | undefined) ?? (env.OFFLOAD_SERVER || undefined);
        broker = await opts.openBroker(configFileOf(program, env), server);
        return broker;
      })();
      return brokerPromise;
    },
    print: (value, human, o) => out.print(value, human, o),
    note: (text) => out.error(text),
    table: (rows, columns) => out.table(rows, columns),
    setExitCode: (code) => {
      exitCode = code;
    },
    progress: (label) => out.progress(label),
  };

  await opts.register(program, ctx);
  for (const cmd of allCommands(program)) {
    cmd.exitOverride();
    cmd.configureOutput({ writeOut: (s) => io.stdout.write(s), writeErr: (s) => io.stderr.write(s), outputError: () => undefined });
  }

  try {
    await program.parseAsync(argv, { from: 'user' });
  } catch (e) {
    exitCode = reportError(e, out, opts.usageExitCode ?? 2);
  } finally {
    if (broker) await broker.close().catch(() => undefined);
  }
  return exitCode;
}

/** The config file: `--config`, $OFFLOAD_CONFIG or ./offload.yaml. */
export function configFileOf(program: Command, env: NodeJS.ProcessEnv): string {
  return (program.opts().config as string | undefined) ?? env.OFFLOAD_CONFIG ?? './offload.yaml';
}

function allCommands(c: Command): Command[] {
  return [c, ...c.commands.flatMap(allCommands)];
}

function reportError(e: unknown, out: Output, usage: number): number {
  if (e instanceof CommanderError) {
    if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version') return 0;
    // Help shown because a command was missing (`offload`, `offload volume`) is bad usage.
    if (e.code === 'commander.help') return usage;
    out.error(`offload: ${e.message.replace(/^error: /, '')}`);
    return usage;
  }
  if (e instanceof UsageError) {
    out.error(`offload: ${e.message}`);
    return usage;
  }
  if (e instanceof OffloadError) {
    if (out.json) out.print({ error: e.toJSON() });
    out.error(`offload: ${isConfigError(e) ? 'config error' : e.code}: ${e.describe()}`);
    // Bad input (a broken config, an invalid name or size) is bad usage: exit 2 — but a job that
    // started and then failed is a failed operation, whatever its error.
    return e.code === 'InvalidArgument' && e.data?.job === undefined ? usage : 1;
  }
  const msg = e instanceof Error ? e.message : String(e);
  out.error(`offload: internal error: ${secrets.redact(msg.split('\n')[0]!)}`);
  if (process.env.OFFLOAD_DEBUG && e instanceof Error && e.stack) out.error(e.stack);
  return 1;
}
