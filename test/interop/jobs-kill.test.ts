/**
 * Kill tests: a child process runs a chain job and is killed (SIGKILL) just before a random one
 * of its image writes — across the copy, the flush, the header rewrite and the pivot. After each
 * kill `qemu-img check` finds no corruption, the chain reads exactly as before, and resuming from
 * the checkpoint (or running again) completes the job. The normal suite kills each job 3 times
 * (once at random, and at its last two writes: the header rewrite / pivot); OFFLOAD_LONG=1 adds
 * ≥30 random kills per job and a stream-to-base case.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { openImage } from '../../plugins/qcow2/index.js';
import { commitTask, copyToRaw, progressPathFor, streamTask } from '../../plugins/qcow2/jobs/index.js';
import { HAVE_QEMU, backingOf, check, compare, copyDir, qimg, qio, rng, run, tempDir } from './jobs-support.js';
import { fileContext, type FileContext } from './jobs-kill-support.js';
import { tsChild } from '../support/ts-child.js';

const LONG = process.env.OFFLOAD_LONG === '1';
const KILLS = LONG ? 30 : 1;
const cleanups: (() => void)[] = [];
afterAll(() => cleanups.forEach((c) => c()));

function dir(): string {
  const t = tempDir('jobs-kill-');
  cleanups.push(t.cleanup);
  return t.dir;
}

/** A 3-deep chain with small clusters (many metadata writes) and its content as raw. */
function buildChain(size = '16M'): string {
  const d = dir();
  qimg(d, 'create', '-f', 'qcow2', '-o', 'cluster_size=16k', 'base.qcow2', size);
  qio(d, 'base.qcow2', ['write -P 1 0 5M', 'write -P 2 9M 2M']);
  qimg(d, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2');
  // Scattered small writes: many separate allocations, so many distinct kill points.
  const scattered = (pat: number, from: number) => Array.from({ length: 40 }, (_, i) => `write -P ${pat} ${from + i * 97 * 1024} 4k`);
  qio(d, 'mid.qcow2', ['write -P 3 1M 3M', 'write -z 10M 256k', 'write -P 4 13M 1M', ...scattered(6, 5 << 20)]);
  qimg(d, 'create', '-f', 'qcow2', '-o', 'cluster_size=8k', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2');
  qio(d, 'top.qcow2', ['write -P 5 2M 1M', 'write -z 9M 64k', ...scattered(9, 11 << 20)]);
  qimg(d, 'convert', '-O', 'raw', 'top.qcow2', 'orig.raw');
  return d;
}

function child(job: string, d: string, killAt: number): { killed: boolean; writes: number } {
  const r = spawnSync(process.execPath, [...tsChild('test/interop/jobs-kill-child.ts'), job, d, String(killAt), `${d}/state.json`], {
    encoding: 'utf8', timeout: 60_000,
  });
  if (r.signal === 'SIGKILL') return { killed: true, writes: killAt };
  if (r.status !== 0) throw new Error(`child ${job} failed: ${r.stderr}`);
  return { killed: false, writes: Number(/writes=(\d+)/.exec(r.stdout)?.[1]) };
}

/** No corruption (leaks allowed), in every file of the chain. */
function expectNoCorruption(d: string, files: string[]): void {
  for (const f of files) {
    const c = check(d, f);
    expect([0, 3], `${f}: ${c.text}`).toContain(c.status);
  }
}

/** Kill points: random, plus the last writes (flush, header rewrite, pivot). */
function killPoints(total: number, seed: number): number[] {
  const r = rng(seed);
  const points = new Set<number>([total, total - 1].filter((n) => n >= 1));
  while (points.size < Math.min(total, KILLS + 2)) points.add(1 + Math.floor(r() * total));
  return [...points].sort((a, b) => a - b);
}

interface KillCase {
  job: string;
  files: string[];
  /** Re-run or resume in this process from the child's checkpoint (in `ctx`). */
  resume(d: string, ctx: FileContext): Promise<void>;
  /** After completion: what the chain must look like. */
  after(d: string): void;
  /** An active commit starts over when resumed (what its killed run tracked is lost with it). */
  startsOver?: boolean;
}

const cases: KillCase[] = [
  {
    job: 'stream',
    files: ['top.qcow2', 'mid.qcow2', 'base.qcow2'],
    async resume(d, ctx) {
      await streamTask(`${d}/top.qcow2`).run(ctx);
    },
    after(d) { expect(backingOf(d, 'top.qcow2')).toBe(''); },
  },
  ...(!LONG ? [] : [{
    job: 'stream-base',
    files: ['top.qcow2', 'mid.qcow2', 'base.qcow2'],
    async resume(d: string, ctx: FileContext) {
      await streamTask(`${d}/top.qcow2`, { base: 'base.qcow2' }).run(ctx);
    },
    after(d: string) { expect(backingOf(d, 'top.qcow2')).toBe('base.qcow2'); },
  }]),
  {
    job: 'commit',
    files: ['top.qcow2', 'mid.qcow2', 'base.qcow2'],
    async resume(d, ctx) {
      // Killed after the switch: mid is no longer in the chain, and the job is done.
      if (backingOf(d, 'top.qcow2') !== 'base.qcow2') await commitTask(`${d}/top.qcow2`, { top: 'mid.qcow2' }).run(ctx);
    },
    after(d) { expect(backingOf(d, 'top.qcow2')).toBe('base.qcow2'); },
  },
  {
    job: 'active',
    startsOver: true,
    files: ['top.qcow2', 'mid.qcow2', 'base.qcow2'],
    async resume(d, ctx) {
      await commitTask(`${d}/top.qcow2`, { active: true, base: 'base.qcow2' }).run(ctx);
    },
    after(d) {
      // After the pivot, base alone holds what the chain showed.
      expect(compare(d, 'base.qcow2', 'orig.raw').status).toBe(0);
    },
  },
];

describe.skipIf(!HAVE_QEMU)('chain jobs killed at random points', () => {
  it.each(cases)('$job: every kill leaves a valid chain that reads as before; resuming completes', async (c) => {
    const template = buildChain();
    const dry = dir();
    copyDir(template, dry);
    const { writes } = child(c.job, dry, 0);
    expect(writes).toBeGreaterThan(5);
    console.log(`${c.job}: ${writes} image writes in a full run`);
    let killed = 0;
    let fromCheckpoint = 0;
    for (const n of killPoints(writes, writes * 7 + c.job.length)) {
      const d = dir();
      copyDir(template, d);
      const r = child(c.job, d, n);
      if (!r.killed) continue;
      killed++;
      expectNoCorruption(d, c.files.filter((f) => existsSync(`${d}/${f}`)));
      // Before the switch the chain reads as before; after it, too (same content, new chain).
      expect(compare(d, 'top.qcow2', 'orig.raw').status, `kill at write ${n}/${writes}`).toBe(0);
      const ctx = fileContext(`${d}/state.json`, { autoComplete: true });
      await c.resume(d, ctx);
      if (ctx.resumeFrom !== undefined && (ctx.firstProgress ?? 0) > 0) fromCheckpoint++;
      expectNoCorruption(d, c.files);
      expect(compare(d, 'top.qcow2', 'orig.raw').status, `after resume, kill at ${n}`).toBe(0);
      c.after(d);
    }
    expect(writes).toBeGreaterThanOrEqual(KILLS);
    expect(killed).toBeGreaterThanOrEqual(KILLS);
    // Some of the resumes started from a checkpoint the killed job had saved, not from zero —
    // except an active commit's, which always start over.
    if (c.startsOver) expect(fromCheckpoint).toBe(0);
    else expect(fromCheckpoint).toBeGreaterThan(0);
  }, LONG ? 900_000 : 120_000);

  it('a raw-target stream killed mid-way resumes from its progress record, which is removed when done', async () => {
    const d = buildChain('64M');
    qio(d, 'top.qcow2', ['write -P 7 40M 8M', 'write -P 8 60M 1M']);
    qimg(d, 'convert', '-O', 'raw', 'top.qcow2', 'orig.raw');
    const r = child('raw', d, 10);
    expect(r.killed).toBe(true);
    expect(existsSync(progressPathFor(`${d}/out.raw`))).toBe(true);
    const src = await openImage(`${d}/top.qcow2`);
    const ctx = fileContext(`${d}/unused-state.json`);
    try { await copyToRaw(src, `${d}/out.raw`, ctx); } finally { await src.close(); }
    // Resumed: progress started past what the killed run had already made durable.
    expect(ctx.firstProgress).toBeGreaterThan(0);
    expect(ctx.current).toBe(ctx.total); // data bytes, as every copy counts them
    expect(ctx.total).toBeGreaterThan(16 << 20);
    expect(existsSync(progressPathFor(`${d}/out.raw`))).toBe(false);
    expect(statSync(`${d}/out.raw`).size).toBe(64 << 20);
    expect(run('cmp', ['out.raw', 'orig.raw'], d).status).toBe(0);
  }, 60_000);
});
