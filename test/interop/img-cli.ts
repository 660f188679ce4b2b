/** Running `offload img …` in-process with a CliContext that captures output (for tests). */
import { Command } from 'commander';
import type { CliContext } from '../../core/index.js';
import { registerImgCommands } from '../../plugins/qcow2/cli/img-command.js';
import type { RunResult } from './img-qemu.js';

/**
 * Run `offload img ARGS` in-process through a commander program and a capturing CliContext.
 * Human text is written followed by a newline, as a terminal print would.
 */
export async function runImg(args: string[], cwd: string, opts: { json?: boolean } = {}): Promise<RunResult> {
  let stdout = '';
  let stderr = '';
  let status = 0;
  const ctx: CliContext = {
    broker: () => Promise.reject(new Error('no broker in img tests')),
    json: opts.json ?? false,
    print(value, human) {
      if (ctx.json || human === undefined) {
        stdout += JSON.stringify(value) + '\n';
        return;
      }
      const h = typeof human === 'function' ? human() : human;
      stdout += (Array.isArray(h) ? h.join('\n') : h) + '\n';
    },
    table(rows) {
      stdout += JSON.stringify(rows) + '\n';
    },
    note(text) {
      stderr += text + '\n';
    },
    setExitCode(code) {
      status = code;
    },
    progress: () => ({ update() {}, done() {} }),
  };
  const program = new Command()
    .exitOverride()
    .configureOutput({ writeErr: (s) => (stderr += s), writeOut: (s) => (stdout += s), outputError: () => undefined });
  registerImgCommands(program, ctx, { stderr: (line) => (stderr += line + '\n') });
  const prev = process.cwd();
  process.chdir(cwd);
  try {
    await program.parseAsync(['img', ...args], { from: 'user' });
  } catch (e) {
    const err = e as { code?: string; message?: string; describe?: () => string };
    // One line, as bin/offload prints it: "offload: CODE: message (hint)".
    stderr += `offload: ${typeof err.describe === 'function' ? `${err.code}: ${err.describe()}` : err.message}\n`;
    // As bin/offload maps them for `img` (qemu-img's codes): a failure, bad usage included, is 1.
    status = 1;
  } finally {
    process.chdir(prev);
  }
  return { stdout, stderr, status };
}
