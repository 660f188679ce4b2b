/**
 * A stream job on the local pool survives a kill -9 of the broker process: the next broker
 * resumes it from its checkpoint, the clone ends up independent with the right data, and
 * qemu-img check finds every file clean.
 */
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { spawnSync } from 'node:child_process';
import { afterAll, describe, expect, it } from 'vitest';
import { createBroker, silentLogger, type Broker } from '../../core/index.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';
import { HAVE_QEMU_IMG, MiB } from './pool-helpers.js';

const ROOT = resolve(import.meta.dirname, '../..');
const root = mkdtempSync(join(tmpdir(), 'offload-pool-restart-'));
const state = join(root, 'state');
const pool = join(root, 'pool');
mkdirSync(pool);
afterAll(() => rmSync(root, { recursive: true, force: true }));

const open = (): Promise<Broker> =>
  createBroker({ state, backends: [{ name: 'local', kind: 'qcow2', path: pool }] }, { plugins: [qcow2Module], logger: silentLogger });
const fill = (i: number) => Buffer.alloc(MiB, (i * 37 + 11) & 0xff);

describe('pool stream across a broker crash', () => {
  it('is resumed by the next broker and completes with the right data', async () => {
    const setup = await open();
    await setup.volumes.create('local/base', { sizeBytes: 64 * MiB });
    const dev = await setup.volumes.open('local/base', 'rw');
    for (let i = 0; i < 32; i++) await dev.write(i * 2 * MiB, fill(i));
    await dev.close();
    await setup.snapshots.create('local/base@s');
    await setup.clone('local/base@s', 'local/kid', { mode: 'linked' });
    await setup.close();

    const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'test/pool/stream-child.ts'), state, pool], { cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'] });
    const id = await new Promise<string>((done, fail) => {
      let out = '';
      child.stdout.on('data', (d: Buffer) => {
        out += d.toString();
        if (out.includes('\n')) done(out.trim());
      });
      child.on('exit', (c) => fail(new Error(`child exited with ${c}`)));
    });
    // Let it copy a few chunks at 4 MiB/s, then kill it without warning.
    await new Promise((r) => setTimeout(r, 2500));
    const exited = new Promise((r) => child.on('exit', r));
    child.kill('SIGKILL');
    await exited;

    const broker = await open();
    try {
      const before = broker.jobs.get(id).info();
      // resumed (not restarted from zero, not already finished)
      expect(['created', 'running']).toContain(before.status);
      expect(before.progress.current).toBeGreaterThan(0);
      expect(before.progress.current).toBeLessThan(before.progress.total);
      const info = await broker.jobs.wait(id);
      expect(info.error).toBeUndefined();
      expect(info.status).toBe('concluded');
      const kid = await broker.volumes.get('local/kid');
      expect(kid.parent).toBeUndefined();
      // the parent can go now, and the clone still reads the data
      await broker.snapshots.delete('local/base@s');
      await broker.volumes.delete('local/base');
      const r = await broker.volumes.open('local/kid', 'r');
      for (let i = 0; i < 32; i++) expect(Buffer.from(await r.read(i * 2 * MiB, MiB)).equals(fill(i))).toBe(true);
      expect((await r.read(MiB, MiB)).every((b) => b === 0)).toBe(true);
      await r.close();
    } finally {
      await broker.close();
    }
    if (HAVE_QEMU_IMG) {
      for (const f of readdirSync(pool).filter((n) => n.endsWith('.qcow2'))) {
        const c = spawnSync('qemu-img', ['check', join(pool, f)], { encoding: 'utf8' });
        expect(c.status, `${f}: ${c.stdout}${c.stderr}`).toBe(0);
      }
    }
  });
});
