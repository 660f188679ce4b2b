/** Shared helpers for the chain-job tests: a real job manager, qemu-img/qemu-io on temp chains. */
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ADMIN, LockManager, silentLogger, type Job, type JobContext, type JobTask } from '../../core/index.js';
import { JobManager } from '../../core/jobs/job-manager.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';

export const HAVE_QEMU = spawnSync('qemu-img', ['--version']).status === 0 && spawnSync('qemu-io', ['--version']).status === 0;
if (!HAVE_QEMU) process.stderr.write('\n*** qemu-img/qemu-io not found: chain-job interop tests are SKIPPED (install qemu-utils) ***\n\n');

export interface Run { status: number; stdout: string; stderr: string }

export function run(cmd: string, args: string[], cwd?: string): Run {
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', maxBuffer: 64 << 20, env: { ...process.env, LC_ALL: 'C' } });
  if (r.error) throw r.error;
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

export function ok(cmd: string, args: string[], cwd?: string): string {
  const r = run(cmd, args, cwd);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** qemu-img in `dir`. */
export const qimg = (dir: string, ...args: string[]) => ok('qemu-img', args, dir);
/** qemu-io commands on one file in `dir`. */
export const qio = (dir: string, file: string, cmds: string[], fmt = 'qcow2') =>
  ok('qemu-io', ['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), file], dir);

/** `qemu-img compare` exit status (0 identical, 1 differ). */
export function compare(dir: string, a: string, b: string): Run {
  return run('qemu-img', ['compare', a, b], dir);
}

/** `qemu-img check` → status and JSON. */
export function check(dir: string, file: string): { status: number; json: Record<string, unknown>; text: string } {
  const r = run('qemu-img', ['check', '--output=json', file], dir);
  return { status: r.status, json: r.stdout.trim() ? JSON.parse(r.stdout) : {}, text: r.stdout + r.stderr };
}

/** The backing file name stored in an image ('' when none). */
export function backingOf(dir: string, file: string): string {
  const info = JSON.parse(qimg(dir, 'info', '--output=json', '-U', file)) as Record<string, unknown>;
  return (info['backing-filename'] as string | undefined) ?? '';
}

export function tempDir(prefix = 'jobs-'): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Copy every file of `from` into a fresh folder (a chain keeps its relative names). */
export function copyDir(from: string, to: string): void {
  for (const f of readdirSync(from)) copyFileSync(join(from, f), join(to, f));
}

export function newManager(): JobManager {
  return new JobManager(new SqliteStateStore(':memory:'), new LockManager(), async () => undefined, silentLogger);
}

/** Run `fn` as a core job (progress, pause, cancel, speed through a real JobManager). */
export async function startJob(manager: JobManager, type: string, fn: (ctx: JobContext) => Promise<unknown>, speed?: number): Promise<Job> {
  const task: JobTask = { type, params: {}, run: async (ctx) => { await fn(ctx); } };
  return manager.start({ task, ref: `${type}-${Math.random()}`, executor: 'host', principal: ADMIN, locks: [], ...(speed ? { speed } : {}) });
}

export async function runJob(type: string, fn: (ctx: JobContext) => Promise<unknown>): Promise<void> {
  const job = await startJob(newManager(), type, fn);
  await job.result();
}

export async function runTask(task: JobTask): Promise<Job> {
  const job = await newManager().start({ task, ref: `${task.type}-${Math.random()}`, executor: 'host', principal: ADMIN, locks: [] });
  await job.result();
  return job;
}

/** Deterministic pseudo-random generator for the live and kill tests. */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x / 0x1_0000_0000;
  };
}
