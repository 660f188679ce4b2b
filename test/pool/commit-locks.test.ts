/**
 * A commit writes a volume's data into its snapshots: it holds them exclusively, so it waits for
 * (and is refused while) anything reading one — a backup copying from its marker, a read-only
 * export of a snapshot. Until now it held the volume only: a commit into the marker while a
 * backup copied from it put data written after the point into the point. And a job that reads a
 * snapshot (a copy, a clone, an export to a file) holds it, so it is not deleted under the job.
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createBroker, silentLogger, type Broker } from '../../core/index.js';
import { builtinPlugins } from '../../plugins/index.js';

const MiB = 1024 * 1024;
let dir: string;
let b: Broker;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'offload-commit-locks-'));
  mkdirSync(join(dir, 'pool'));
  b = await createBroker({ state: join(dir, 'state'), lockWaitSeconds: 1, backends: [{ name: 'p', kind: 'qcow2', path: join(dir, 'pool') }] },
    { plugins: builtinPlugins, logger: silentLogger });
});
afterAll(async () => {
  await b.close();
  rmSync(dir, { recursive: true, force: true });
});

async function fill(ref: string, value: number, bytes = 8 * MiB): Promise<void> {
  const dev = await b.volumes.open(ref, 'rw');
  try {
    await dev.write(0, Buffer.alloc(bytes, value));
  } finally {
    await dev.close();
  }
}

async function count(ref: string, bytes: number): Promise<Record<number, number>> {
  const dev = await b.volumes.open(ref, 'r');
  try {
    const out: Record<number, number> = {};
    for (const x of await dev.read(0, bytes)) out[x] = (out[x] ?? 0) + 1;
    return out;
  } finally {
    await dev.close();
  }
}

describe('a commit holds the snapshots it writes into', () => {
  it('is refused while a backup copies from its marker; the point holds only what was written before it', async () => {
    await b.volumes.create('p/v1', { sizeBytes: 16 * MiB });
    await fill('p/v1', 1);
    const backup = await b.backups.start('p/v1', { to: 'p/v1-bk', speed: 4 * MiB });
    const [marker] = await b.snapshots.list('p/v1');
    await fill('p/v1', 2); // after the point
    await expect(b.commit('p/v1', { base: marker!.name })).rejects.toMatchObject({ code: 'Busy', message: expect.stringContaining(backup.id) });
    await backup.wait();
    expect(await count('p/v1-bk', 8 * MiB)).toEqual({ 1: 8 * MiB });
    // Once the backup is done (its marker kept as the next one's base), the commit goes through.
    const [kept] = await b.snapshots.list('p/v1');
    const done = await (await b.commit('p/v1', { base: kept!.name })).wait();
    expect(done.error).toBeUndefined();
  });

  it('is refused while a snapshot is exported read-only; goes through once the export ends', async () => {
    await b.volumes.create('p/v2', { sizeBytes: 16 * MiB });
    await fill('p/v2', 3);
    await b.snapshots.create('p/v2@s1');
    await fill('p/v2', 4);
    const served = await b.exports.start('p/v2@s1', { name: 'v2-s1', readOnly: true, listen: { host: '127.0.0.1', port: 0 } });
    try {
      await expect(b.commit('p/v2', { base: 's1' })).rejects.toMatchObject({ code: 'Busy', message: expect.stringContaining('v2-s1') });
    } finally {
      await b.exports.stop(served.name);
    }
    const done = await (await b.commit('p/v2', { base: 's1' })).wait();
    expect(done.error).toBeUndefined();
    expect(await count('p/v2', 8 * MiB)).toEqual({ 4: 8 * MiB });
  });
});

describe('a job reading a snapshot holds it', () => {
  it('a copy, a clone through the host, an instant clone and an export to a file from a snapshot: its delete is Busy naming the job until it ends', async () => {
    await b.volumes.create('p/r1', { sizeBytes: 8 * MiB });
    await fill('p/r1', 5);
    await b.snapshots.create('p/r1@s');
    await b.volumes.create('p/r1-copy', { sizeBytes: 8 * MiB });
    const slow = { speed: 2 * MiB };
    const jobs = [
      await b.copy('p/r1@s', 'p/r1-copy', slow),
      (await b.startClone('p/r1@s', 'p/r1-clone', { mode: 'full', prefer: 'host', ...slow })).job!,
      (await b.startClone('p/r1@s', 'p/r1-instant', { instant: true, ...slow })).job!,
      await b.volumes.exportTo('p/r1@s', join(dir, 'r1.raw'), slow),
    ];
    for (const job of jobs) {
      await expect(b.snapshots.delete('p/r1@s')).rejects.toMatchObject({ code: 'Busy', message: expect.stringContaining(job.id) });
      await job.cancel();
      await job.wait();
    }
    await b.snapshots.delete('p/r1@s');
    expect(await b.snapshots.list('p/r1')).toEqual([]);
  });
});
