/**
 * A backup point stopped half-way (the broker closes under it) is resumed by the next broker from
 * its checkpoint — not from zero — and the point, once taken, restores to the source as it was
 * when the backup began; an incremental point resumes the same way, asking for the same changes;
 * a group resumes in the disk it had reached.
 */
import { afterAll, describe, expect, it } from 'vitest';
import type { Broker } from '../../core/index.js';
import { failedChecks, HAVE_QEMU_IMG, MiB, restartFixture, runAndKill } from './pool-helpers.js';

const { open, cleanup, state, pool } = restartFixture('offload-backup-restart-');
afterAll(cleanup);

const SIZE = 32 * MiB;
const fill = (seed: number, n: number) => Buffer.alloc(n, (seed * 37 + 11) & 0xff);

async function readAll(b: Broker, ref: string): Promise<Buffer> {
  const d = await b.volumes.open(ref, 'r');
  try {
    return Buffer.from(await d.read(0, SIZE));
  } finally {
    await d.close();
  }
}

async function write(b: Broker, ref: string, at: [number, number, number][]): Promise<void> {
  const d = await b.volumes.open(ref, 'rw');
  try {
    for (const [off, len, seed] of at) await d.write(off, fill(seed, len));
    await d.flush();
  } finally {
    await d.close();
  }
}

/** Start a backup at 4 MiB/s, close the broker once it is `atLeast` bytes along; the job's id. */
async function stopHalfway(b: Broker, atLeast: number): Promise<string> {
  const job = await b.backups.start('local/src', { to: 'local/set', speed: 4 * MiB });
  const id = job.info().id;
  for (let i = 0; i < 500 && (await b.jobs.get(id)).info().progress.current < atLeast; i++) await new Promise((r) => setTimeout(r, 20));
  await b.close();
  return id;
}

describe('backup across a broker restart', () => {
  it('a full point and an incremental point each resume from their checkpoint and restore right', async () => {
    let b = await open();
    await b.volumes.create('local/src', { sizeBytes: SIZE });
    await write(b, 'local/src', [[0, 16 * MiB, 1]]);
    const atB1 = await readAll(b, 'local/src');
    const id1 = await stopHalfway(b, 6 * MiB);

    b = await open();
    const before = (await b.jobs.get(id1)).info();
    expect(before.progress.current).toBeGreaterThan(0); // resumed, not restarted from zero
    expect(before.progress.current).toBeLessThan(before.progress.total);
    await b.jobs.setSpeed(id1, 0); // the rest at full speed: the limit only made the stop land half-way
    const info1 = await b.jobs.wait(id1);
    expect(info1.error).toBeUndefined();
    expect(info1.status).toBe('concluded');
    // A write after the backup began is not in the point.
    await write(b, 'local/src', [[0, 12 * MiB, 2], [20 * MiB, 2 * MiB, 3]]);
    const atB2 = await readAll(b, 'local/src');
    const id2 = await stopHalfway(b, 4 * MiB);

    b = await open();
    try {
      const mid = (await b.jobs.get(id2)).info();
      expect(mid.progress.current).toBeGreaterThan(0);
      expect(mid.progress.total).toBeLessThanOrEqual(14 * MiB + 256 * 1024); // only the changes
      await b.jobs.setSpeed(id2, 0);
      const info2 = await b.jobs.wait(id2);
      expect(info2.error).toBeUndefined();
      expect((await b.backups.list('local/set')).map((p) => p.point)).toEqual([1, 2]);
      for (const [point, want] of [[1, atB1], [2, atB2]] as const) {
        const job = await b.backups.restore(`local/set@b${point}`, { to: `local/back${point}` });
        expect((await job.wait()).error).toBeUndefined();
        expect((await readAll(b, `local/back${point}`)).equals(want), `b${point}`).toBe(true);
      }
    } finally {
      await b.close();
    }
  });

  it('a group (two disks) stopped in its second disk resumes there: the first is not copied again; both points restore right', async () => {
    let b = await open();
    for (const v of ['local/ga', 'local/gb']) {
      await b.volumes.create(v, { sizeBytes: SIZE });
    }
    await write(b, 'local/ga', [[0, 8 * MiB, 31]]);
    await write(b, 'local/gb', [[4 * MiB, 8 * MiB, 32]]);
    const want = [await readAll(b, 'local/ga'), await readAll(b, 'local/gb')];
    const job = await b.backups.startGroup([{ source: 'local/ga', to: 'local/gset-a' }, { source: 'local/gb', to: 'local/gset-b' }], { speed: 4 * MiB });
    const id = job.info().id;
    for (let i = 0; i < 1000 && (await b.jobs.get(id)).info().progress.current < 10 * MiB; i++) await new Promise((r) => setTimeout(r, 20));
    await b.close();

    b = await open();
    try {
      // The first disk counted as done (test/core/backup-group-task.test.ts shows it is not read again).
      expect((await b.jobs.get(id)).info().progress.current).toBeGreaterThanOrEqual(8 * MiB);
      await b.jobs.setSpeed(id, 0);
      const info = await b.jobs.wait(id);
      expect(info.error).toBeUndefined();
      expect(info.progress).toMatchObject({ current: 16 * MiB, total: 16 * MiB }); // nothing copied twice, as far as progress tells
      for (const [i, set] of ['local/gset-a', 'local/gset-b'].entries()) {
        expect((await b.backups.list(set)).map((p) => p.point)).toEqual([1]);
        const r = await b.backups.restore(`${set}@b1`, { to: `local/gback-${i}` });
        expect((await r.wait()).error).toBeUndefined();
        expect((await readAll(b, `local/gback-${i}`)).equals(want[i]!)).toBe(true);
      }
    } finally {
      await b.close();
    }
  });

  it('kill -9 of the broker mid-point: the next broker resumes it from its checkpoint; the point restores right and no file is damaged', async () => {
    let b = await open();
    for (const v of ['local/back1', 'local/back2']) await b.volumes.delete(v);
    for (const p of await b.backups.list('local/set')) await b.snapshots.delete(p.ref);
    await b.volumes.delete('local/set');
    await write(b, 'local/src', [[0, 20 * MiB, 7]]);
    const want = await readAll(b, 'local/src');
    await b.close();
    const id = await runAndKill('backup', state, pool, 6 * MiB);
    b = await open();
    try {
      const before = (await b.jobs.get(id)).info();
      expect(before.progress.current).toBeGreaterThan(0); // resumed, not restarted from zero
      expect(before.progress.current).toBeLessThan(before.progress.total);
      await b.jobs.setSpeed(id, 0);
      const info = await b.jobs.wait(id);
      expect(info.error).toBeUndefined();
      const job = await b.backups.restore('local/set@b1', { to: 'local/back-k' });
      expect((await job.wait()).error).toBeUndefined();
      expect((await readAll(b, 'local/back-k')).equals(want)).toBe(true);
    } finally {
      await b.close();
    }
    if (HAVE_QEMU_IMG) expect(failedChecks(pool, { killed: true })).toEqual([]);
  });
});
