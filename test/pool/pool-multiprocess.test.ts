/**
 * Many processes, one pool: brokers in separate processes (each with its own state directory, so
 * only the pool itself can keep them apart) change one pool folder at once. Structural changes
 * are serialized through the pool's metadata: nothing fails that should not, a name two processes
 * create at once goes to exactly one, and every file and row is consistent afterwards. A volume
 * one process has open cannot have its layers changed by another (Busy naming that process).
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it } from 'vitest';
import { createBroker, silentLogger } from '../../core/index.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';
import type { Qcow2Pool } from '../../plugins/qcow2/pool/pool-backend.js';
import { failedChecks, HAVE_QEMU_IMG, MiB, restartFixture } from './pool-helpers.js';
import { tsChild } from '../support/ts-child.js';

const { state, pool, cleanup } = restartFixture('offload-pool-multi-');
afterAll(cleanup);
const ROOT = join(import.meta.dirname, '../..');

function worker(args: string[]): { done: Promise<string>; firstLine: Promise<string>; end(): void; go(): void } {
  const child = spawn(process.execPath, [...tsChild('test/pool/pool-worker.ts'), ...args], { cwd: ROOT, stdio: ['pipe', 'pipe', 'inherit'] });
  let out = '';
  let first!: (s: string) => void;
  const firstLine = new Promise<string>((r) => { first = r; });
  child.stdout.on('data', (d: Buffer) => {
    out += d.toString();
    if (out.includes('\n')) first(out.slice(0, out.indexOf('\n')));
  });
  const done = new Promise<string>((resolve, reject) => child.on('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`worker ${args.join(' ')} exited ${code}: ${out}`)))));
  return { done, firstLine, end: () => child.stdin.end(), go: () => child.stdin.end('go\n') };
}

const open = (dir: string) => createBroker({ state: join(state, dir), backends: [{ name: 'local', kind: 'qcow2', path: pool }] }, { plugins: [qcow2Module], logger: silentLogger });

/** The pool's lock row and an open-volume row as a process `holder` with `pid` would have left them. */
function leaveRows(volume: string, holder: string, pid: number): void {
  const db = new Database(join(pool, '.offload-pool.db'));
  try {
    db.prepare('INSERT OR REPLACE INTO pool_lock (id, holder, pid, since) VALUES (1, ?, ?, ?)').run(holder, pid, new Date().toISOString());
    db.prepare('INSERT OR REPLACE INTO open_volumes (volume, holder, pid) VALUES (?, ?, ?)').run(volume, holder, pid);
  } finally {
    db.close();
  }
}

describe('many processes on one pool', () => {
  it('three processes create, snapshot, clone and delete at once: no failures, each shared name goes to one, all files check clean', async () => {
    const N = 12;
    const runs = ['a', 'b', 'c'].map((tag) => worker(['cycles', pool, join(state, tag), tag, String(N)]));
    for (const r of runs) expect(await r.firstLine).toBe('ready');
    for (const r of runs) r.go();
    const results = (await Promise.all(runs.map((r) => r.done))).map((o) => JSON.parse(o.trim().split('\n').pop()!) as { ok: boolean; errors: string[]; won: number });
    for (const r of results) expect(r.errors).toEqual([]);
    expect(results.reduce((s, r) => s + r.won, 0)).toBe(N);
    const b = await open('check');
    try {
      const names = (await b.volumes.list('local', { limit: 1000 })).items.map((v) => v.name).sort();
      const expected = ['a', 'b', 'c'].flatMap((t) => Array.from({ length: N }, (_, i) => i).filter((i) => i % 2 === 1).map((i) => `${t}-${i}`));
      expect(names).toEqual([...expected, ...Array.from({ length: N }, (_, i) => `shared-${i}`)].sort());
      for (const t of ['a', 'b', 'c']) {
        const dev = await b.volumes.open(`local/${t}-3`, 'r');
        expect(Buffer.from(await dev.read(3 * 4096, 4096)).every((x) => x === 4)).toBe(true);
        await dev.close();
      }
      const report = await (b.backend('local') as Qcow2Pool).check();
      expect(report.issues).toEqual([]);
      expect(report.clean).toBe(true);
    } finally {
      await b.close();
    }
    if (HAVE_QEMU_IMG) expect(failedChecks(pool)).toEqual([]);
  });

  it('a volume open in another process cannot be snapshotted, reverted, resized or deleted here until it is closed there', async () => {
    const b = await open('here');
    try {
      await b.volumes.create('local/held', { sizeBytes: 4 * MiB });
      await b.snapshots.create('local/held@before');
      const holder = worker(['hold', pool, join(state, 'there'), 'held']);
      expect(await holder.firstLine).toBe('open');
      for (const attempt of [
        () => b.snapshots.create('local/held@now'),
        () => b.snapshots.revert('local/held@before'),
        () => b.volumes.resize('local/held', 8 * MiB),
        () => b.volumes.delete('local/held'),
      ]) {
        await expect(attempt()).rejects.toMatchObject({ code: 'Busy', message: expect.stringMatching(/open in another process \(pid \d+\)/) });
      }
      // Reading it here is fine; once it is closed there, changes go through.
      const r = await b.volumes.open('local/held', 'r');
      expect(Buffer.from(await r.read(0, 4096)).every((x) => x === 7)).toBe(true);
      await r.close();
      holder.end();
      await holder.done;
      await b.snapshots.create('local/held@now');
      await b.volumes.delete('local/held');
    } finally {
      await b.close();
    }
    if (HAVE_QEMU_IMG) expect(failedChecks(pool)).toEqual([]);
  });

  it('rows left by a process that died are not held against anyone, even when this process got its pid again', async () => {
    const b = await open('stale');
    try {
      await b.volumes.create('local/left', { sizeBytes: MiB });
      // As a container's pid 1 killed in a change and restarted as pid 1 again would have left them.
      leaveRows('left', 'dead-holder', process.pid);
      await b.snapshots.create('local/left@s');
      await b.volumes.resize('local/left', 2 * MiB);
      await b.snapshots.delete('local/left@s');
      await b.volumes.delete('local/left');
    } finally {
      await b.close();
    }
  });

  it('rows of an earlier boot (a power loss) are not held against anyone, whatever process has their pid now', async () => {
    const b = await open('reboot');
    try {
      await b.volumes.create('local/before', { sizeBytes: MiB });
      // Written before the reboot by a process whose pid a live process (our parent) has now.
      leaveRows('before', '00000000.0123456789abcdef', process.ppid);
      await b.snapshots.create('local/before@s');
      await b.volumes.delete('local/before');
    } finally {
      await b.close();
    }
  });
});
