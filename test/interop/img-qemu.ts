/** Whether qemu-img/qemu-io are installed, and running them (for the `offload img` tests). */
import { spawnSync } from 'node:child_process';

export const HAVE_QEMU = spawnSync('qemu-img', ['--version']).status === 0 && spawnSync('qemu-io', ['--version']).status === 0;

if (!HAVE_QEMU) {
  // Loud, not silent: these interop tests are skipped.
  process.stderr.write('\n*** qemu-img/qemu-io not found: qemu interop tests are SKIPPED (install qemu-utils) ***\n\n');
}

export interface RunResult {
  stdout: string;
  stderr: string;
  status: number;
}

/** Run a program (qemu-img, qemu-io) in `cwd`; never throws on a non-zero exit. */
export function run(cmd: string, args: string[], cwd: string): RunResult {
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } });
  if (r.error) throw r.error;
  return { stdout: r.stdout, stderr: r.stderr, status: r.status ?? -1 };
}

