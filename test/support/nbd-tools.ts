/** The real NBD clients the export is tested with (Debian: qemu-utils, libnbd-bin, nbdkit), and running them. */
import { spawn, spawnSync } from 'node:child_process';

function has(cmd: string, args = ['--version']): boolean {
  const r = spawnSync(cmd, args, { stdio: 'ignore' });
  return r.status === 0;
}

export const HAVE = {
  qemu: has('qemu-img') && has('qemu-io') && has('qemu-nbd'),
  libnbd: has('nbdinfo') && has('nbdcopy'),
  nbdkit: has('nbdkit'),
};

const missing = [!HAVE.qemu && 'qemu-utils', !HAVE.libnbd && 'libnbd-bin', !HAVE.nbdkit && 'nbdkit'].filter(Boolean);
if (missing.length > 0) {
  // Loud, not silent: the cases that need them are skipped.
  process.stderr.write(`\n*** ${missing.join(', ')} not installed: NBD client tests that need them are SKIPPED ***\n\n`);
}

export interface ToolResult { stdout: string; stderr: string; status: number }

/**
 * Run a client without blocking the event loop (the server under test lives in this process).
 * Never throws on a non-zero exit.
 */
export function tool(cmd: string, args: string[], o: { cwd?: string; input?: string } = {}): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { cwd: o.cwd, env: { ...process.env, LC_ALL: 'C' } });
    let stdout = '';
    let stderr = '';
    p.stdout.setEncoding('utf8').on('data', (d: string) => { stdout += d; });
    p.stderr.setEncoding('utf8').on('data', (d: string) => { stderr += d; });
    p.on('error', reject);
    p.on('close', (code) => resolve({ stdout, stderr, status: code ?? -1 }));
    if (o.input !== undefined) p.stdin.end(o.input);
    else p.stdin.end();
  });
}

/** Run a client and fail with its output when it exits non-zero. */
export async function ok(cmd: string, args: string[], o: { cwd?: string } = {}): Promise<string> {
  const r = await tool(cmd, args, o);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}:\n${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** qemu-io's output has no errors (it exits 0 even when a command failed). */
export async function qemuIo(uri: string, cmds: string[], o: { readOnly?: boolean } = {}): Promise<string> {
  const args = ['-f', 'raw', ...(o.readOnly ? ['-r'] : []), ...cmds.flatMap((c) => ['-c', c]), uri];
  const out = await ok('qemu-io', args);
  if (/fail|error|Pattern verification failed/i.test(out)) throw new Error(`qemu-io ${cmds.join('; ')}:\n${out}`);
  return out;
}

/** `qemu-img map --output=json` of a URI or file, as entries. */
export async function qemuMap(target: string, format = 'raw'): Promise<{ start: number; length: number; depth: number; present: boolean; zero: boolean; data: boolean }[]> {
  const out = await ok('qemu-img', ['map', '--output=json', '-f', format, target]);
  return (JSON.parse(out) as { start: number; length: number; depth: number; present: boolean; zero: boolean; data: boolean }[])
    .map(({ start, length, depth, present, zero, data }) => ({ start, length, depth, present, zero, data }));
}
