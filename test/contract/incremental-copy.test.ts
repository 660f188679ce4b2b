/**
 * Incremental copies (`copy SRC DST --since S1`) between every pair of backends — the pool, the
 * SAN mock and the NAS mock, the same backend included: DST first gets a full copy of SRC as it
 * is at S1, then SRC changes (data over data, zeros over data, data into holes, a partial
 * block), and the incremental copy must leave DST equal to SRC byte for byte — what a full copy
 * would — while moving only the changed ranges through the host. A backend that cannot say what
 * changed is refused with the reason, before any job starts.
 */
import { describe, expect, it } from 'vitest';
import type { Broker } from '../../core/index.js';
import { allBackendsForFile, patternBytes as bytes, withDevice } from '../support/all-backends.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const BACKENDS = ['local', 'san1', 'nas1'] as const;


/** Before S1: data here; the rest stays a hole. */
const BEFORE: readonly [number, number][] = [[0, 2 * MiB], [5 * MiB, MiB], [SIZE - 64 * 1024, 64 * 1024]];
/** After S1: [offset, length, data | zero] — over data, over holes, partial blocks. */
const AFTER: readonly [number, number, 'data' | 'zero'][] = [
  [512 * 1024, 4096, 'data'],
  [MiB + 100, 70_000, 'data'],
  [5 * MiB, 256 * 1024, 'zero'],
  [9 * MiB, 128 * 1024, 'data'], // into a hole
  [SIZE - 4096, 4096, 'data'],
];

describe('incremental copies between every pair of backends equal full copies', () => {
  let broker: Broker;
  allBackendsForFile('offload-incr-', (all) => { broker = all.broker; });

  async function write(ref: string, seed: number, layout: readonly (readonly [number, number, ('data' | 'zero')?])[]): Promise<void> {
    await withDevice(broker, ref, 'rw', async (dev) => {
      for (const [off, len, kind] of layout) {
        if (kind === 'zero') await (dev.writeZeroes ? dev.writeZeroes(off, len) : dev.write(off, new Uint8Array(len)));
        else await dev.write(off, bytes(seed, off, len));
      }
      await dev.flush();
    });
  }

  const read = (ref: string) => withDevice(broker, ref, 'r', async (d) => Buffer.from(await d.read(0, SIZE)));

  let seed = 0;
  for (const from of BACKENDS) {
    for (const to of BACKENDS) {
      it(`${from} → ${to}`, async () => {
        const s = ++seed;
        const src = `${from}/inc-src-${s}`;
        const dst = `${to}/inc-dst-${s}`;
        await broker.volumes.create(src, { sizeBytes: SIZE });
        await write(src, s, BEFORE);
        await broker.snapshots.create(`${src}@s1`);
        await broker.volumes.create(dst, { sizeBytes: SIZE });
        // A target full of other bytes first: the full copy must overwrite all of it.
        await withDevice(broker, dst, 'rw', async (d) => { await d.write(0, new Uint8Array(SIZE).fill(0xee)); await d.flush(); });
        expect((await (await broker.copy(src, dst)).wait()).error).toBeUndefined();
        await write(src, s + 1000, AFTER);

        const changes = await broker.volumes.changes(src, { since: 's1' });
        const changedBytes = changes.extents.reduce((n, e) => n + e.length, 0);
        for (const [off, len] of AFTER) {
          expect(changes.extents.some((e) => e.offset <= off && off + len <= e.offset + e.length), `${from}: change at ${off} listed`).toBe(true);
        }
        const info = await (await broker.copy(src, dst, { since: 's1' })).wait();
        expect(info.error).toBeUndefined();
        expect(info.status).toBe('concluded');
        // Only the changes crossed the host: the data among them, at most.
        expect(info.progress.total).toBeLessThanOrEqual(changedBytes);
        expect(info.progress.current).toBe(info.progress.total);
        const [a, b] = await Promise.all([read(src), read(dst)]);
        const diff = a.findIndex((x, i) => x !== b[i]);
        expect(diff, `${dst} differs from ${src} first at byte ${diff}`).toBe(-1);
      });
    }
  }

  it('from a later snapshot (vol@s2) of the pool, and through the changes API of each point', async () => {
    const src = 'local/inc-snap';
    await broker.volumes.create(src, { sizeBytes: SIZE });
    await write(src, 7, BEFORE);
    await broker.snapshots.create(`${src}@s1`);
    await broker.volumes.create('san1/inc-snap-dst', { sizeBytes: SIZE });
    expect((await (await broker.copy(`${src}@s1`, 'san1/inc-snap-dst')).wait()).error).toBeUndefined();
    await write(src, 8, AFTER);
    await broker.snapshots.create(`${src}@s2`);
    const want = await read(src);
    await write(src, 9, [[12 * MiB, MiB, 'data']]); // after s2: must not be copied
    const c = await broker.volumes.changes(`${src}@s2`, { since: `${src}@s1` });
    expect(c.extents.some((e) => e.offset >= 12 * MiB && e.offset < 13 * MiB)).toBe(false);
    expect((await (await broker.copy(`${src}@s2`, 'san1/inc-snap-dst', { since: 's1' })).wait()).error).toBeUndefined();
    expect(want.equals(await read('san1/inc-snap-dst'))).toBe(true);
  });

  it('refuses with the reason, before a job: no such snapshot, another volume\'s snapshot, a source older than since, a live resume of a source not exported', async () => {
    const src = 'local/inc-bad';
    await broker.volumes.create(src, { sizeBytes: SIZE });
    await broker.volumes.create('local/inc-bad-dst', { sizeBytes: SIZE });
    await broker.snapshots.create(`${src}@a`);
    await broker.snapshots.create(`${src}@b`);
    const before = (await broker.jobs.list({ all: true })).length;
    await expect(broker.copy(src, 'local/inc-bad-dst', { since: 'nope' })).rejects.toMatchObject({ code: 'NotFound' });
    await expect(broker.copy(src, 'local/inc-bad-dst', { since: 'local/other@a' })).rejects.toMatchObject({ code: 'InvalidArgument' });
    await expect(broker.copy(`${src}@a`, 'local/inc-bad-dst', { since: 'b' })).rejects.toMatchObject({ code: 'InvalidArgument' });
    // Live and --since resumes a cancelled live copy: its source must be exported here.
    await expect(broker.copy(src, 'local/inc-bad-dst', { since: 'a', live: true })).rejects.toMatchObject({ code: 'FailedPrecondition', message: expect.stringContaining('not exported') });
    expect((await broker.jobs.list({ all: true })).length).toBe(before);
  });
});
