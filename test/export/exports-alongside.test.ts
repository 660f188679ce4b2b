/**
 * Whom an administrator's snapshot delete stops, now that snapshots of a disk in use are deleted
 * within its export: a tenant's writable export of the volume is spared (the delete is made
 * within it), a tenant's export of that snapshot or a backup job reading it is stopped, as any
 * request of an administrator stops a tenant's. And an export that starts alongside another (a
 * snapshot's beside its volume's) is still a new export: a backend being taken out of the config
 * admits none.
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { createBroker, silentLogger, tenant, type Broker } from '../../core/index.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';
import { memoryModule } from '../support/memory-backend.js';

const MiB = 1024 * 1024;

describe('exports alongside: preemption and a draining backend', () => {
  let state: string;
  let broker: Broker;
  const config = () => ({ state, lockWaitSeconds: 3, backends: [{ name: 'local', kind: 'qcow2', path: join(state, 'pool') }, { name: 'old', kind: 'qcow2', path: join(state, 'old') }, {
    name: 'norevert', kind: 'memory', capabilities: ['volume.create', 'volume.delete', 'volume.resize', 'volume.list', 'snapshot.create', 'snapshot.delete', 'data.read', 'data.write', 'data.extents'],
  }] });
  beforeAll(async () => {
    state = mkdtempSync(join(tmpdir(), 'offload-alongside-'));
    mkdirSync(join(state, 'pool'));
    mkdirSync(join(state, 'old'));
    broker = await createBroker(config(), { plugins: [qcow2Module, memoryModule], logger: silentLogger });
  });
  afterAll(async () => {
    await broker?.close();
    if (state) rmSync(state, { recursive: true, force: true });
  });

  it("an administrator deletes a snapshot of a tenant's disk in use: the disk's export is spared, the snapshot's export is stopped", async () => {
    const t1 = broker.as(tenant('t1'));
    await t1.volumes.create('local/v', { sizeBytes: 4 * MiB });
    await t1.snapshots.create('local/v@s1');
    await t1.snapshots.create('local/v@s2');
    const disk = await t1.exports.start('local/v', { listen: { port: 0 } });
    const point = await t1.exports.start('local/v@s1', { listen: { port: 0 } });
    // Another broker on the same state (another process, as far as locks go).
    const other = await createBroker(config(), { plugins: [qcow2Module, memoryModule], logger: silentLogger });
    try {
      await other.snapshots.delete('local/v@s2'); // asked of this broker, which serves the disk: not stopped for it
      await broker.snapshots.delete('local/v@s1');
      await point.stopped;
      expect((await broker.snapshots.list('local/v')).map((x) => x.name)).toEqual([]);
      expect((await broker.exports.list()).map((e) => e.name)).toEqual(['local/v']);
    } finally {
      await other.close();
      await point.stop().catch(() => undefined);
      await disk.stop();
    }
  });

  it("an administrator's snapshot of a tenant's disk under a live copy: Busy naming the copy, which goes on (not stopped for it)", async () => {
    const t1 = broker.as(tenant('t1'));
    await t1.volumes.create('local/mv', { sizeBytes: 4 * MiB });
    const disk = await t1.exports.start('local/mv', { listen: { port: 0 } });
    try {
      const job = await t1.liveCopy([{ source: 'local/mv', target: 'local/mv-to' }]);
      for (let i = 0; i < 500 && (await broker.jobs.get(job.id)).info().status !== 'ready'; i++) await new Promise((r) => setTimeout(r, 10));
      await expect(broker.snapshots.create('local/mv@adm')).rejects.toMatchObject({ code: 'Busy', message: expect.stringContaining(job.id) });
      expect((await broker.jobs.get(job.id)).info().status).toBe('ready');
      await job.cancel();
      await job.wait();
    } finally {
      await disk.stop();
    }
  });

  it("an administrator deletes the marker a tenant's backup job reads: the job is stopped, the delete goes through", async () => {
    const t1 = broker.as(tenant('t1'));
    await t1.volumes.create('local/c', { sizeBytes: 8 * MiB });
    const d = await t1.volumes.open('local/c', 'rw');
    await d.write(0, Buffer.alloc(8 * MiB, 0x41));
    await d.close();
    const job = await t1.backups.start('local/c', { to: 'local/c-bk', speed: 256 * 1024 });
    const marker = (await broker.snapshots.list('local/c')).map((x) => x.name).find((n) => n.startsWith('bk-'))!;
    await broker.snapshots.delete(`local/c@${marker}`);
    expect((await job.wait()).status).toBe('concluded');
    expect((await broker.snapshots.list('local/c')).map((x) => x.name)).not.toContain(marker);
  });

  it("a backup's previous marker, exported (a backup application reading the last point): the next backup, which would drop it, is Busy", async () => {
    // Into a backend that cannot revert: each point is a full copy, and the previous marker is dropped at its end.
    await broker.volumes.create('local/src', { sizeBytes: 4 * MiB });
    expect((await (await broker.backups.start('local/src', { to: 'norevert/set' })).wait()).error).toBeUndefined();
    const [marker] = (await broker.snapshots.list('local/src')).map((x) => x.name);
    const reading = await broker.exports.start(`local/src@${marker}`, { listen: { port: 0 } });
    const snapshots = vi.spyOn(broker.backend('local'), 'createSnapshot');
    try {
      await expect(broker.backups.start('local/src', { to: 'norevert/set' })).rejects.toMatchObject({ code: 'Busy', message: expect.stringMatching(/export local\/src@bk-/) });
      expect(snapshots).not.toHaveBeenCalled(); // refused before its marker was taken
      expect((await broker.snapshots.list('local/src')).map((x) => x.name)).toEqual([marker]); // the new marker dropped, the read one kept
    } finally {
      snapshots.mockRestore();
      await reading.stop();
    }
    expect((await (await broker.backups.start('local/src', { to: 'norevert/set' })).wait()).error).toBeUndefined();
    expect((await broker.snapshots.list('local/src')).map((x) => x.name)).not.toContain(marker);
  });

  it('no new writable export starts on a backend being taken out of the config, one of its snapshots exported or not', async () => {
    await broker.volumes.create('old/v', { sizeBytes: 4 * MiB });
    await broker.volumes.create('old/u', { sizeBytes: 4 * MiB });
    await broker.snapshots.create('old/v@s1');
    const e = await broker.exports.start('old/v@s1', { listen: { port: 0 } });
    try {
      const r = await broker.reconfigure({ ...config(), backends: [config().backends[0]!] });
      expect(r.kept.map((k) => k.name)).toContain('old');
      for (const ref of ['old/u', 'old/v']) {
        await expect(broker.exports.start(ref, { name: `w-${ref}`, listen: { port: 0 } })).rejects.toMatchObject({ code: 'FailedPrecondition' });
      }
    } finally {
      await e.stop();
    }
  });
});
