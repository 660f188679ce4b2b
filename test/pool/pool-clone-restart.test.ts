/**
 * A full clone on the local pool is a copy through the host, run as a job: killed with the
 * broker process half-way, it is resumed by the next broker from its checkpoint (reading only
 * what lies above it), and the new volume ends up complete, made once, with the source's data.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { bytesReadByProcess, failedChecks, HAVE_QEMU_IMG, MiB, restartFixture, runAndKill } from './pool-helpers.js';

const { state, pool, open, cleanup } = restartFixture('offload-pool-clone-restart-');
afterAll(cleanup);
const fill = (i: number) => Buffer.alloc(MiB, (i * 29 + 5) & 0xff);

describe('pool full clone across a broker crash', () => {
  it('is resumed by the next broker from its checkpoint and completes with the right data', async () => {
    const setup = await open();
    await setup.volumes.create('local/src', { sizeBytes: 64 * MiB });
    const dev = await setup.volumes.open('local/src', 'rw');
    for (let i = 0; i < 32; i++) await dev.write(i * 2 * MiB, fill(i));
    await dev.close();
    // The plan says what it is: the target is created, then the data crosses the host.
    expect((await setup.plan({ op: 'clone', source: 'local/src', target: 'local/dst', mode: 'full' })).steps.map((s) => [s.action, s.executor]))
      .toEqual([['volume.create', 'backend:local'], ['data.copy', 'host']]);
    await setup.close();

    const id = await runAndKill('clone', state, pool, 20 * MiB);

    const readBefore = bytesReadByProcess();
    const broker = await open();
    try {
      const before = (await broker.jobs.get(id)).info();
      expect(before).toMatchObject({ type: 'clone', executor: 'host' });
      expect(['created', 'running']).toContain(before.status);
      expect(before.progress.current).toBeGreaterThan(0);
      expect(before.progress.current).toBeLessThan(before.progress.total);
      const info = await broker.jobs.wait(id);
      expect(info.error).toBeUndefined();
      // Only the data above the checkpoint was read again (32 MiB in all; ≥ 20 MiB were done). The
      // saved checkpoint may lag the progress by a window of the fast path and a second of saves
      // (4 MiB each at 4 MiB/s); 2 MiB more for metadata. A restart from zero would read 32 MiB.
      const read = bytesReadByProcess() - readBefore;
      expect(read).toBeLessThan(before.progress.total - before.progress.current + 10 * MiB);
      expect(read).toBeLessThan(24 * MiB);
      const r = await broker.volumes.open('local/dst', 'r');
      for (let i = 0; i < 32; i++) {
        expect(Buffer.from(await r.read(i * 2 * MiB, MiB)).equals(fill(i))).toBe(true);
        expect((await r.read(i * 2 * MiB + MiB, MiB)).every((b) => b === 0)).toBe(true);
      }
      await r.close();
      expect((await broker.volumes.listAll('local')).map((v) => v.name).sort()).toEqual(['dst', 'src']);
      expect((await broker.volumes.get('local/dst')).parent).toBeUndefined();
    } finally {
      await broker.close();
    }
    if (HAVE_QEMU_IMG) expect(failedChecks(pool, { killed: true })).toEqual([]);
  });
});
