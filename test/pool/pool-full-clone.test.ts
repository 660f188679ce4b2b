/**
 * A full clone in the local pool is a copy through the host run as a job (not a call inside the
 * pool's serial section): its plan says so, the pool takes other changes while it runs, it can be
 * paused and cancelled (the target it made goes), and the copy is as sparse as the source.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { MiB, openPool, pattern, read, write, type PoolFixture } from './pool-helpers.js';

let fx: PoolFixture;
beforeEach(async () => { fx = await openPool(); });
afterEach(async () => { await fx.close(); });

describe('qcow2 pool: full clones are jobs', () => {
  it('the plan moves the data through the host; the pool is not blocked meanwhile; cancel removes the target', async () => {
    const b = fx.broker;
    await b.volumes.create('local/src', { sizeBytes: 64 * MiB });
    for (let i = 0; i < 8; i++) await write(b, 'local/src', i * 8 * MiB, pattern(i, MiB));
    await b.snapshots.create('local/src@s');
    const plan = await b.plan({ op: 'clone', source: 'local/src@s', target: 'local/full', mode: 'full' });
    expect(plan.steps.map((s) => [s.action, s.executor, s.hostBytes])).toEqual([['volume.create', 'backend:local', 0], ['data.copy', 'host', undefined]]);

    const { job } = await b.startClone('local/src@s', 'local/full', { mode: 'full', speed: MiB });
    for (let i = 0; i < 500 && job!.info().progress.current === 0; i++) await new Promise((r) => setTimeout(r, 10));
    // Other changes to the pool go on while the clone job runs.
    await b.volumes.create('local/other', { sizeBytes: 8 * MiB });
    await b.snapshots.create('local/other@o');
    await write(b, 'local/src', 0, pattern(99, MiB)); // the source volume moved on: the clone reads the snapshot
    expect(job!.info().status).toBe('running');
    expect(job!.info().progress.current).toBeLessThan(8 * MiB);
    job!.pause();
    expect(job!.info().status).toBe('paused');
    await b.jobs.cancel(job!.id);
    await expect(job!.result()).rejects.toMatchObject({ code: 'Cancelled' });
    await expect(b.volumes.get('local/full')).rejects.toMatchObject({ code: 'NotFound' });

    // Run to the end: the snapshot's data, as sparse as the source.
    const done = await b.startClone('local/src@s', 'local/full', { mode: 'full' });
    expect((await done.job!.result()).progress.current).toBe(8 * MiB);
    for (let i = 0; i < 8; i++) expect(Buffer.compare(await read(b, 'local/full', i * 8 * MiB, MiB), Buffer.from(pattern(i, MiB)))).toBe(0);
    expect((await read(b, 'local/full', MiB, MiB)).every((x) => x === 0)).toBe(true);
    const dev = await b.volumes.open('local/full', 'r');
    expect((await dev.extents()).filter((e) => e.kind === 'data').reduce((n, e) => n + e.length, 0)).toBe(8 * MiB);
    await dev.close();
    expect((await b.volumes.get('local/full')).parent).toBeUndefined();
  });
});
