import type { Command } from 'commander';
import type { Broker } from '../broker-api.js';

/** What a CLI command gets: the lazily opened broker, the output helpers and the global flags. */
export interface CliContext {
  /** Open (once) the broker described by the global `--config`. */
  broker(): Promise<Broker>;
  /** True when `--json` was given. */
  readonly json: boolean;
  /**
   * Print a result: `human` (lines, or a function producing them) on a terminal, `value` as JSON
   * with `--json` (on one line with `oneLine`, for a script that reads while the command runs).
   * Secrets are redacted from JSON output.
   */
  print(value: unknown, human?: string | string[] | (() => string | string[]), opts?: { oneLine?: boolean }): void;
  /** A status line for the person watching (stderr): never part of a command's result. */
  note(text: string): void;
  /** Print rows as an aligned table (or the rows as JSON with `--json`). */
  table(rows: Record<string, unknown>[], columns: string[]): void;
  /** Set the process exit code for a command whose result is not plain success (e.g. `img check`). */
  setExitCode(code: number): void;
  /** Progress for long jobs: a bar on a TTY, nothing otherwise. */
  progress(label: string): { update(current: number, total: number): void; done(): void };
}

/**
 * The contribution point through which plugins add their own commands (`offload img …`,
 * `offload appliance …`). A plugin's ContainerModule binds an instance to this token.
 */
export interface CliContribution {
  register(program: Command, ctx: CliContext): void;
}
export const CliContribution = Symbol.for('offload/CliContribution');

/** Thrown by a command for bad usage: printed as one line, exit code 2. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

/**
 * The shared command group `name` under `program`, created on first use. Several plugins add
 * commands to one group (`offload appliance flasharray`, `offload appliance ontap`) without
 * knowing about each other.
 */
export function commandGroup(program: Command, name: string, description: string): Command {
  const existing = program.commands.find((c) => c.name() === name);
  return existing ?? program.command(name).description(description);
}
