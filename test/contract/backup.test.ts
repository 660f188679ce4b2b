/**
 * Incremental backup and restore (`backup VOL --to BACKEND/NAME`, `restore`): a chain of points
 * in a backup volume on another backend, the first a full copy and each later one only the
 * changes; every point restores to exactly the source as it was when the point was taken; a
 * source in use (exported read-write, written meanwhile) is backed up from its point in time; a
 * cancelled point leaves the backup as it was and the next point is still incremental.
 */
import { describe, expect, it } from 'vitest';
import type { Broker } from '../../core/index.js';
import { allBackendsForFile, patternBytes, withDevice } from '../support/all-backends.js';
import { NbdWriter } from '../support/nbd-writer.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

const bytes = (seed: number, length: number): Uint8Array => patternBytes(seed, 0, length);

describe('backup and restore across backends', () => {
  let broker: Broker;
  allBackendsForFile('offload-backup-', (all) => { broker = all.broker; });

  const read = (ref: string, size = SIZE) => withDevice(broker, ref, 'r', async (d) => Buffer.from(await d.read(0, size)));
  async function write(ref: string, at: [number, number, number][]): Promise<void> {
    await withDevice(broker, ref, 'rw', async (d) => {
      for (const [off, len, seed] of at) await d.write(off, bytes(seed, len));
      await d.flush();
    });
  }
  const done = async (p: Promise<{ wait(): Promise<{ error?: unknown; status: string; progress: { current: number; total: number } }> }>) => {
    const info = await (await p).wait();
    expect(info.error).toBeUndefined();
    expect(info.status).toBe('concluded');
    return info;
  };

  it('local → san1: b1 full, b2 and b3 only the changes; each point restores to the source as it was', async () => {
    const src = 'local/bk-src';
    await broker.volumes.create(src, { sizeBytes: SIZE });
    await write(src, [[0, 4 * MiB, 1], [8 * MiB, 2 * MiB, 2]]);
    const states: Buffer[] = [];
    states.push(await read(src));
    const first = await done(broker.backups.start(src, { to: 'san1/bk-set' }));
    expect(first.progress.total).toBeGreaterThanOrEqual(6 * MiB);

    await write(src, [[MiB, 64 * 1024, 3], [12 * MiB, 64 * 1024, 4]]);
    states.push(await read(src));
    const second = await done(broker.backups.start(src, { to: 'san1/bk-set' }));
    expect(second.progress.total).toBeLessThanOrEqual(4 * 64 * 1024); // only the changes crossed the host

    await write(src, [[0, 512, 5]]);
    await withDevice(broker, src, 'rw', async (d) => { await d.writeZeroes!(8 * MiB, MiB); await d.flush(); });
    states.push(await read(src));
    const third = await done(broker.backups.start(src, { to: 'san1/bk-set' }));
    expect(third.progress.total).toBeLessThanOrEqual(2 * MiB);

    const points = await broker.backups.list('san1/bk-set');
    expect(points.map((p) => p.ref)).toEqual(['san1/bk-set@b1', 'san1/bk-set@b2', 'san1/bk-set@b3']);
    // Only the newest marker is kept on the source.
    expect((await broker.snapshots.list(src)).map((s) => s.name).filter((n) => n.startsWith('bk-'))).toHaveLength(1);

    for (let i = 0; i < 3; i++) {
      const into = `nas1/bk-restored-${i + 1}`;
      await done(broker.backups.restore(`san1/bk-set@b${i + 1}`, { to: into }));
      expect((await read(into)).equals(states[i]!), `b${i + 1}`).toBe(true);
    }
    // The latest point, back over the source itself.
    await write(src, [[0, MiB, 9]]);
    await done(broker.backups.restore('san1/bk-set', { to: src }));
    expect((await read(src)).equals(states[2]!)).toBe(true);
  });

  it('a source in use: the point is the source at the moment the backup began, while a guest writes over NBD', async () => {
    const src = 'local/bk-live';
    await broker.volumes.create(src, { sizeBytes: SIZE });
    await write(src, [[0, 2 * MiB, 11]]);
    const exp = await broker.exports.start(src, { name: 'bk-live', listen: { port: 0 } });
    const port = Number(new URL(exp.uri).port);
    const writer = await NbdWriter.start({ port, name: 'bk-live', span: 4 * MiB, pauseMs: 2 }, Buffer.alloc(SIZE));
    try {
      for (let i = 0; i < 200 && writer.acked < 20; i++) await new Promise((r) => setTimeout(r, 10));
      await done(broker.backups.start(src, { to: 'local/bk-live-set' }));
      const ackedDuring = writer.acked;
      for (let i = 0; i < 200 && writer.acked < ackedDuring + 20; i++) await new Promise((r) => setTimeout(r, 10));
      expect(writer.acked).toBeGreaterThan(ackedDuring); // the guest went on writing
      // The point equals the source's marker snapshot: one instant, not a mix of before and after.
      const marker = (await broker.snapshots.list(src)).find((x) => x.name.startsWith('bk-'))!;
      await done(broker.backups.restore('local/bk-live-set@b1', { to: 'san1/bk-live-check' }));
      const snap = await broker.backend('local').openSnapshot!('bk-live', marker.name);
      const at = Buffer.from(await snap.read(0, SIZE));
      await snap.close();
      expect((await read('san1/bk-live-check')).equals(at)).toBe(true);
      expect(at.subarray(2 * MiB, 4 * MiB).some((b) => b !== 0)).toBe(true); // the guest's writes before the point are in it
    } finally {
      await writer.stop();
      await exp.stop();
    }
  });

  it('a cancelled point leaves the backup at the previous one, and the next point is still only the changes', async () => {
    const src = 'local/bk-cancel';
    await broker.volumes.create(src, { sizeBytes: SIZE });
    await write(src, [[0, 8 * MiB, 21]]);
    await done(broker.backups.start(src, { to: 'local/bk-cancel-set' }));
    const atB1 = await read(src);
    await write(src, [[0, 4 * MiB, 22]]);
    const job = await broker.backups.start(src, { to: 'local/bk-cancel-set', speed: 256 * 1024 });
    for (let i = 0; i < 100 && job.info().progress.current === 0; i++) await new Promise((r) => setTimeout(r, 20));
    await broker.jobs.cancel(job.info().id);
    const info = await job.wait();
    expect(info.error?.code).toBe('Cancelled');
    expect((await broker.backups.list('local/bk-cancel-set')).map((p) => p.point)).toEqual([1]);
    expect((await read('local/bk-cancel-set')).equals(atB1)).toBe(true);
    const next = await done(broker.backups.start(src, { to: 'local/bk-cancel-set' }));
    expect(next.progress.total).toBeLessThanOrEqual(4 * MiB + 128 * 1024);
    expect((await read('local/bk-cancel-set')).equals(await read(src))).toBe(true);
  });

  it('a cancelled first point removes the backup volume it made, and the next backup starts it again', async () => {
    const src = 'local/bk-cancel-first';
    await broker.volumes.create(src, { sizeBytes: SIZE });
    await write(src, [[0, 8 * MiB, 23]]);
    const job = await broker.backups.start(src, { to: 'san1/bk-cancel-first-set', speed: 256 * 1024 });
    for (let i = 0; i < 100 && job.info().progress.current === 0; i++) await new Promise((r) => setTimeout(r, 20));
    await broker.jobs.cancel(job.info().id);
    expect((await job.wait()).error?.code).toBe('Cancelled');
    await expect(broker.volumes.get('san1/bk-cancel-first-set')).rejects.toMatchObject({ code: 'NotFound' });
    expect((await broker.snapshots.list(src)).filter((x) => x.name.startsWith('bk-'))).toEqual([]);
    await done(broker.backups.start(src, { to: 'san1/bk-cancel-first-set' }));
    expect((await read('san1/bk-cancel-first-set')).equals(await read(src))).toBe(true);
  });

  it('a backup volume changed between points is put back to its last point first; a source that shrank and grew leaves no stale data', async () => {
    const src = 'local/bk-odd';
    await broker.volumes.create(src, { sizeBytes: SIZE / 2 });
    await write(src, [[0, MiB, 31]]);
    await broker.snapshots.create(`${src}@small`);
    await broker.volumes.resize(src, SIZE);
    await write(src, [[12 * MiB, MiB, 32]]);
    await done(broker.backups.start(src, { to: 'san1/bk-odd-set' }));
    // Someone writes into the backup volume (a mount that replays a journal).
    await write('san1/bk-odd-set', [[2 * MiB, MiB, 99], [12 * MiB, 4096, 98]]);
    await write(src, [[3 * MiB, 64 * 1024, 33]]);
    await done(broker.backups.start(src, { to: 'san1/bk-odd-set' }));
    expect((await read('san1/bk-odd-set')).equals(await read(src))).toBe(true);
    // The source goes back to its 8 MiB snapshot, is backed up, and grows again.
    await broker.snapshots.revert(`${src}@small`);
    await done(broker.backups.start(src, { to: 'san1/bk-odd-set' }));
    const b3 = await read('san1/bk-odd-set');
    expect(b3.subarray(SIZE / 2).every((x) => x === 0)).toBe(true); // no stale tail past the point's end
    await broker.volumes.resize(src, SIZE);
    await done(broker.backups.start(src, { to: 'san1/bk-odd-set' }));
    expect((await read('san1/bk-odd-set')).equals(await read(src))).toBe(true);
  });

  it('refuses to back up into an existing volume that is not a backup', async () => {
    await broker.volumes.create('local/bk-victim', { sizeBytes: MiB });
    await broker.volumes.create('local/bk-src2', { sizeBytes: MiB });
    await expect(broker.backups.start('local/bk-src2', { to: 'local/bk-victim' })).rejects.toMatchObject({ code: 'AlreadyExists' });
    expect((await broker.snapshots.list('local/bk-src2')).length).toBe(0); // no marker left behind
  });

  it('refuses what it cannot do, with the reason: into itself, a missing point, a volume of another tenant', async () => {
    await broker.volumes.create('local/bk-bad', { sizeBytes: MiB });
    await expect(broker.backups.start('local/bk-bad', { to: 'local/bk-bad' })).rejects.toMatchObject({ code: 'InvalidArgument' });
    await expect(broker.backups.restore('local/bk-none@b1', { to: 'local/x' })).rejects.toMatchObject({ code: 'NotFound' });
    const tenant = broker.as({ id: 't1', role: 'tenant' });
    await expect(tenant.backups.start('local/bk-bad', { to: 'local/t1-set' })).rejects.toMatchObject({ code: 'NotFound' });
  });
});
