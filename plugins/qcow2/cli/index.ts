/** The qcow2 plugin's command-line contribution: `offload img …`. */
import type { Command } from 'commander';
import type { CliContext, CliContribution } from '../../../core/index.js';
import { registerImgCommands, type ImgCommandOptions } from './img-command.js';

export function createImgCliContribution(options: ImgCommandOptions = {}): CliContribution {
  return {
    register(program: Command, ctx: CliContext): void {
      registerImgCommands(program, ctx, options);
    },
  };
}

/** `offload img` writing diagnostics to the process's stderr. */
export const imgCliContribution: CliContribution = createImgCliContribution();

export { registerImgCommands, type ImgCommandOptions } from './img-command.js';
export { qemuJsonPretty, tdbHash } from './qemu-json.js';
