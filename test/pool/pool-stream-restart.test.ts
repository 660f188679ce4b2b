/**
 * A stream job on the local pool survives a kill -9 of the broker process: the next broker
 * resumes it from its checkpoint (it reads only what lies above it), the clone ends up
 * independent with the right data, and qemu-img check finds no file damaged (the kill may leave
 * leaked clusters: space, as QEMU leaves them).
 */
import { afterAll, describe, expect, it } from 'vitest';
import { bytesReadByProcess, failedChecks, fill, HAVE_QEMU_IMG, MiB, restartFixture, runAndKill, setUpKid } from './pool-helpers.js';

const { state, pool, open, cleanup } = restartFixture('offload-pool-restart-');
afterAll(cleanup);

describe('pool stream across a broker crash', () => {
  it('is resumed by the next broker and completes with the right data', async () => {
    const setup = await open();
    await setUpKid(setup);
    await setup.close();

    // Let it copy at 4 MiB/s until 40 of the 64 MiB are done, then kill it without warning.
    const id = await runAndKill('stream', state, pool, 40 * MiB);

    const readBefore = bytesReadByProcess();
    const broker = await open();
    try {
      const before = (await broker.jobs.get(id)).info();
      // resumed (not restarted from zero, not already finished)
      expect(['created', 'running']).toContain(before.status);
      expect(before.progress.current).toBeGreaterThan(0);
      expect(before.progress.current).toBeLessThan(before.progress.total);
      const info = await broker.jobs.wait(id);
      // What the resumed run read: the data above its checkpoint (half of every 2 MiB is data; the
      // saved checkpoint may lag the progress by a second of saves, 4 MiB of data at 4 MiB/s), with
      // slack for metadata — not all 32 MiB of data again.
      const read = bytesReadByProcess() - readBefore;
      expect(read).toBeGreaterThan(MiB);
      expect(read).toBeLessThan((before.progress.total - before.progress.current) / 2 + 8 * MiB);
      expect(read).toBeLessThan(24 * MiB);
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
    if (HAVE_QEMU_IMG) expect(failedChecks(pool, { killed: true })).toEqual([]);
  });
});
