import type { Command } from 'commander';
import type { CliContext } from '../contribution.js';
import { registerBackendsCommand } from './backends.js';
import { registerVolumeCommands } from './volume.js';
import { registerSnapshotCommands } from './snapshot.js';
import { registerDataJobCommands } from './data-jobs.js';
import { registerBackupCommands } from './backup.js';
import { registerPlanCommand } from './plan.js';
import { registerJobsCommands } from './jobs.js';
import { registerLocksCommands } from './locks.js';
import { registerNbdCommand } from './nbd.js';
import { registerServeCommand, type OpenServiceBroker } from './serve.js';

/** The broker verbs on refs, the same for every backend, and `offload serve` (which opens its broker with `openService`). */
export function registerBrokerCommands(program: Command, ctx: CliContext, openService: OpenServiceBroker): void {
  registerBackendsCommand(program, ctx);
  registerVolumeCommands(program, ctx);
  registerSnapshotCommands(program, ctx);
  registerDataJobCommands(program, ctx);
  registerBackupCommands(program, ctx);
  registerPlanCommand(program, ctx);
  registerJobsCommands(program, ctx);
  registerLocksCommands(program, ctx);
  registerNbdCommand(program, ctx);
  registerServeCommand(program, ctx, openService);
}
