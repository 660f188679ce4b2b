/** A broker around one local qcow2 pool in a temporary folder, plus qemu-img helpers (pool tests). */
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect } from 'vitest';
import { createBroker, silentLogger, type Broker } from '../../core/index.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';
import { Qcow2Pool } from '../../plugins/qcow2/pool/pool-backend.js';
import { tsChild } from '../support/ts-child.js';

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;

export const HAVE_QEMU_IMG = spawnSync('qemu-img', ['--version']).status === 0;
if (!HAVE_QEMU_IMG) process.stderr.write('\n*** qemu-img not found: pool interop checks are SKIPPED (install qemu-utils) ***\n\n');

export interface PoolFixture {
  broker: Broker;
  pool: Qcow2Pool;
  dir: string;
  close(): Promise<void>;
}

export async function openPool(extra: Record<string, unknown> = {}, dir?: string): Promise<PoolFixture> {
  const root = mkdtempSync(join(tmpdir(), 'offload-pool-test-'));
  const poolDir = dir ?? join(root, 'pool');
  if (!dir) mkdirSync(poolDir);
  const broker = await createBroker(
    { state: join(root, 'state'), backends: [{ name: 'local', kind: 'qcow2', path: poolDir, ...extra }] },
    { plugins: [qcow2Module], logger: silentLogger },
  );
  const pool = broker.backend('local') as Qcow2Pool;
  return {
    broker, pool, dir: poolDir,
    async close() {
      await broker.close();
      if (!dir) rmSync(root, { recursive: true, force: true });
    },
  };
}

export const pattern = (seed: number, len: number) => Uint8Array.from({ length: len }, (_, i) => (seed * 31 + i * 7 + (i >> 9)) & 0xff);

export async function write(b: Broker, ref: string, off: number, data: Uint8Array): Promise<void> {
  const dev = await b.volumes.open(ref, 'rw');
  try {
    await dev.write(off, data);
    await dev.flush();
  } finally {
    await dev.close();
  }
}

export async function read(b: Broker, ref: string, off: number, len: number): Promise<Buffer> {
  const dev = await b.volumes.open(ref, 'r');
  try {
    return Buffer.from(await dev.read(off, len));
  } finally {
    await dev.close();
  }
}

/** Layer files in the pool folder (not the metadata). */
export function layerFiles(dir: string): string[] {
  return readdirSync(dir).filter((f) => !f.startsWith('.')).sort();
}

export function fileBytes(path: string): { size: number; allocated: number } {
  const s = statSync(path);
  return { size: s.size, allocated: s.blocks * 512 };
}

export function qemuImg(args: string[], cwd: string): { status: number; stdout: string; stderr: string } {
  const r = spawnSync('qemu-img', args, { cwd, encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** Bytes this process has read through read(2)-like calls so far (Linux /proc/self/io `rchar`). */
export function bytesReadByProcess(): number {
  const m = /^rchar: (\d+)$/m.exec(readFileSync('/proc/self/io', 'utf8'));
  if (!m) throw new Error('/proc/self/io has no rchar');
  return Number(m[1]);
}

/**
 * Run `test/pool/job-child.ts KIND STATE POOL [FILE]` (a broker with a rate-limited job), wait until
 * its job reports `atLeast` bytes done, then kill it with SIGKILL. Returns the job id.
 */
export async function runAndKill(kind: 'stream' | 'clone' | 'export' | 'import' | 'backup', state: string, pool: string, atLeast: number, file?: string): Promise<string> {
  const { child, id } = await startJobChild(kind, state, pool, atLeast, file);
  const exited = new Promise((r) => child.on('exit', r));
  child.kill('SIGKILL');
  await exited;
  return id;
}

/** A job child as runAndKill starts it, running, with its job `atLeast` bytes along; its stdout after the id in `out()`. */
export async function startJobChild(kind: 'stream' | 'clone' | 'export' | 'import' | 'backup', state: string, pool: string, atLeast: number, file?: string,
  env: NodeJS.ProcessEnv = {}): Promise<{ child: ReturnType<typeof spawn>; id: string; out(): string }> {
  const root = join(import.meta.dirname, '../..');
  const args = [join(root, 'test/pool/job-child.ts'), kind, state, pool, ...(file !== undefined ? [file] : [])];
  const child = spawn(process.execPath, [...tsChild(args[0]!), ...args.slice(1)], { cwd: root, stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, ...env } });
  let out = '';
  const id = await new Promise<string>((done, fail) => {
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('\n')) done(out.slice(0, out.indexOf('\n')).trim());
    });
    child.on('exit', (c) => fail(new Error(`child exited with ${c}`)));
  });
  // Watch its progress from a broker that only looks (recoverJobs: false adopts nothing).
  const watcher = await createBroker({ state, backends: [{ name: 'local', kind: 'qcow2', path: pool }] }, { plugins: [qcow2Module], logger: silentLogger, recoverJobs: false });
  try {
    for (let i = 0; i < 600 && (await watcher.jobs.get(id)).info().progress.current < atLeast; i++) await new Promise((r) => setTimeout(r, 100));
  } finally {
    await watcher.close();
  }
  return { child, id, out: () => out.slice(out.indexOf('\n') + 1) };
}

/** Files of a pool folder that `qemu-img check` does not pass, with its output (empty when all pass). */
/**
 * The qcow2 files of `dir` that qemu-img check does not pass. After a kill -9 mid-write
 * (`o.killed`), leaked clusters are allowed (exit 3: allocated, never referenced — space, not
 * data, as QEMU leaves them; `pool check --repair` reclaims them): where the kill lands in a
 * write decides whether there are any. A corruption (exit 2) never is.
 */
export function failedChecks(dir: string, o: { killed?: boolean } = {}): string[] {
  return layerFiles(dir).filter((f) => f.endsWith('.qcow2')).flatMap((f) => {
    const r = qemuImg(['check', f], dir);
    return r.status === 0 || (o.killed && r.status === 3) ? [] : [`${f}: ${r.stdout}${r.stderr}`];
  });
}

/** A pool and a state folder that outlive one broker: the restart tests open one, kill it, open another. */
export function restartFixture(prefix: string): { state: string; pool: string; open(): Promise<Broker>; cleanup(): void } {
  const root = mkdtempSync(join(tmpdir(), prefix));
  const state = join(root, 'state');
  const pool = join(root, 'pool');
  mkdirSync(pool);
  return {
    state, pool,
    open: () => createBroker({ state, backends: [{ name: 'local', kind: 'qcow2', path: pool }] }, { plugins: [qcow2Module], logger: silentLogger }),
    cleanup: () => rmSync(root, { recursive: true, force: true }),
  };
}

/** The data of the restart and takeover tests: 1 MiB of it every 2 MiB. */
export const fill = (i: number) => Buffer.alloc(MiB, (i * 37 + 11) & 0xff);

/** A fresh linked clone local/kid of local/base@s (32 MiB of data in 64 MiB) for a stream job. */
export async function setUpKid(b: Broker): Promise<void> {
  const names = (await b.volumes.list('local')).items.map((v) => v.name);
  if (names.includes('kid')) await b.volumes.delete('local/kid');
  if (!names.includes('base')) {
    await b.volumes.create('local/base', { sizeBytes: 64 * MiB });
    const dev = await b.volumes.open('local/base', 'rw');
    for (let i = 0; i < 32; i++) await dev.write(i * 2 * MiB, fill(i));
    await dev.close();
    await b.snapshots.create('local/base@s');
  }
  await b.clone('local/base@s', 'local/kid', { mode: 'linked' });
}

export async function kidReadsRight(b: Broker): Promise<void> {
  expect((await b.volumes.get('local/kid')).parent).toBeUndefined();
  const r = await b.volumes.open('local/kid', 'r');
  try {
    for (let i = 0; i < 32; i++) expect(Buffer.from(await r.read(i * 2 * MiB, MiB)).equals(fill(i))).toBe(true);
  } finally {
    await r.close();
  }
}
