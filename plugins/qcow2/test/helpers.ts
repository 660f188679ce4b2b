import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BlockStatus } from '../index.js';

/** Whether qemu-img and qemu-io are installed (interop tests skip loudly when not). */
export const hasQemu = (() => {
  try {
    execFileSync('qemu-img', ['--version'], { stdio: 'ignore' });
    execFileSync('qemu-io', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();

export function warnIfNoQemu(suite: string): void {
  if (!hasQemu) console.warn(`SKIPPED ${suite}: qemu-img/qemu-io are not installed (apt-get install qemu-utils)`);
}

export interface Run { status: number; stdout: string; stderr: string }

export function run(cmd: string, args: string[]): Run {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20 });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** Run and insist on exit 0. */
export function ok(cmd: string, args: string[]): string {
  const r = run(cmd, args);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

export function qemuIo(file: string, cmds: string[], fmt = 'qcow2'): Run {
  return run('qemu-io', ['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), file]);
}

export function qemuCheckJson(file: string, repair?: string): { status: number; json: Record<string, unknown> } {
  const r = run('qemu-img', ['check', '--output=json', ...(repair ? ['-r', repair] : []), file]);
  return { status: r.status, json: r.stdout.trim() ? JSON.parse(r.stdout) : {} };
}

export function tempDir(prefix = 'qcow2-'): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Our block status in the shape `qemu-img map --output=json` (7.2) prints, for comparison. */
export function mapAsQemuJson(list: BlockStatus[]): unknown[] {
  return list.map((s) => {
    const o: Record<string, unknown> = { start: s.start, length: s.length, depth: s.depth, present: s.present, zero: s.zero, data: s.data };
    if (s.offset !== undefined) o.offset = s.offset;
    return o;
  });
}

export function pattern(len: number, seed: number): Uint8Array {
  const b = new Uint8Array(len);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}
