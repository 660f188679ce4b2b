/**
 * The backend layer, part 2: snapshots, clones, dependents, the data path and the chain jobs,
 * calling the StorageBackend directly (a chain job's JobTask is run without the broker).
 */
import { describe, expect } from 'vitest';
import type { JobTask } from '../core/index.js';
import { MiB, pattern, runTask, same, type ContractFixture } from './fixture.js';

export function describeBackendData(fx: ContractFixture): void {
  describe('on the backend directly: snapshots, clones, data and chain jobs', () => {
    const be = () => fx.backend;
    const write = (v: string, off: number, data: Uint8Array) => fx.write(fx.direct(v), off, data);
    const read = (v: string, off: number, len: number) => fx.read(fx.direct(v), off, len);
    const someCloneMode = () => (fx.caps.has('clone.linked') ? 'linked' : 'full');

    fx.case('snapshots: create, create again, list, delete, delete again; an unknown volume is NotFound',
      ['volume.create', 'snapshot.create', 'snapshot.delete'], async () => {
        const v = await fx.create('bsnap');
        const s = await be().createSnapshot(v, 's1');
        expect(s).toMatchObject({ backend: fx.be, volume: v, name: 's1' });
        expect(s.sizeBytes).toBeGreaterThanOrEqual(fx.size);
        expect(await be().createSnapshot(v, 's1')).toMatchObject({ volume: v, name: 's1' });
        expect((await be().listSnapshots(v)).filter((x) => x.name === 's1')).toHaveLength(1);
        await be().deleteSnapshot(v, 's1');
        expect((await be().listSnapshots(v)).map((x) => x.name)).not.toContain('s1');
        await be().deleteSnapshot(v, 's1');
        const ghost = fx.name('bghost');
        await expect(be().createSnapshot(ghost, 's')).rejects.toMatchObject({ code: 'NotFound' });
        await expect(be().listSnapshots(ghost)).rejects.toMatchObject({ code: 'NotFound' });
        await be().deleteSnapshot(ghost, 's');
        expect(await be().getVolume(ghost)).toBeUndefined();
      });

    for (const mode of ['linked', 'full'] as const) {
      fx.case(`a ${mode} clone of a snapshot: again is the same volume, smaller than the source is OutOfRange`,
        ['volume.create', 'snapshot.create', `clone.${mode}`], async () => {
          const v = await fx.create(`bsrc${mode}`);
          await be().createSnapshot(v, 'base');
          const c = fx.name(`bc${mode}`);
          const source = { volume: v, snapshot: 'base' };
          const made = await be().createVolume({ name: c, source, mode, sizeBytes: fx.size * 2 });
          expect(made).toMatchObject({ backend: fx.be, name: c });
          expect(made.sizeBytes).toBeGreaterThanOrEqual(fx.size * 2);
          if (mode === 'full') expect(made.parent).toBeUndefined();
          else expect(made.parent).toBeDefined();
          expect(await be().createVolume({ name: c, source, mode, sizeBytes: fx.size * 2 })).toMatchObject({ name: c, sizeBytes: made.sizeBytes });
          const small = fx.name(`bsmall${mode}`);
          await expect(be().createVolume({ name: small, source, mode, sizeBytes: fx.size / 2 })).rejects.toMatchObject({ code: 'OutOfRange' });
          expect(await be().getVolume(small)).toBeUndefined();
        });

      fx.case(`a ${mode} clone of a volume has its size and its data at clone time`, ['volume.create', `clone.${mode}`], async () => {
        const v = await fx.create(`bvsrc${mode}`);
        const hasData = fx.caps.hasAll('data.read', 'data.write');
        if (hasData) await write(v, 8192, pattern(31, 16 * 1024));
        const c = fx.name(`bvc${mode}`);
        const made = await be().createVolume({ name: c, source: { volume: v }, mode });
        expect(made.sizeBytes).toBe((await be().getVolume(v))!.sizeBytes);
        expect((await be().getVolume(c))?.sizeBytes).toBe(made.sizeBytes);
        if (!hasData) return;
        await write(v, 8192, pattern(32, 16 * 1024));
        expect(same(await read(c, 8192, 16 * 1024), pattern(31, 16 * 1024))).toBe(true);
        await write(c, 0, pattern(33, 4096));
        expect((await read(v, 0, 4096)).every((x) => x === 0)).toBe(true);
        expect(same(await read(v, 8192, 16 * 1024), pattern(32, 16 * 1024))).toBe(true);
      });

      fx.case(`a ${mode} clone holds the source's data at snapshot time; writes on either side stay there`,
        ['volume.create', 'snapshot.create', `clone.${mode}`, 'data.read', 'data.write'], async () => {
          const v = await fx.create(`bdata${mode}`);
          await write(v, 0, pattern(21, 64 * 1024));
          await be().createSnapshot(v, 't0');
          await write(v, 0, pattern(22, 64 * 1024));
          const c = fx.name(`bdc${mode}`);
          await be().createVolume({ name: c, source: { volume: v, snapshot: 't0' }, mode });
          expect(same(await read(c, 0, 64 * 1024), pattern(21, 64 * 1024))).toBe(true);
          await write(c, 4096, pattern(23, 4096));
          expect(same(await read(v, 0, 64 * 1024), pattern(22, 64 * 1024))).toBe(true);
          expect(same(await read(c, 4096, 4096), pattern(23, 4096))).toBe(true);
        });
    }

    fx.case('cloning from an unknown volume or snapshot is NotFound, and nothing is created', ['volume.create'], async (ctx) => {
      if (!fx.caps.has('clone.linked') && !fx.caps.has('clone.full')) ctx.skip('needs clone.linked or clone.full');
      const mode = someCloneMode();
      const c1 = fx.name('bnf');
      await expect(be().createVolume({ name: c1, source: { volume: fx.name('bghost') }, mode })).rejects.toMatchObject({ code: 'NotFound' });
      const v = await fx.create('bnosnap');
      const c2 = fx.name('bnf');
      await expect(be().createVolume({ name: c2, source: { volume: v, snapshot: 'nosuch' }, mode })).rejects.toMatchObject({ code: 'NotFound' });
      expect(await be().getVolume(c1)).toBeUndefined();
      expect(await be().getVolume(c2)).toBeUndefined();
      fx.exercised.add(`clone.${mode}`);
    });

    fx.case('a volume or snapshot with a linked clone cannot be deleted (FailedPrecondition) until the clone is gone',
      ['volume.create', 'volume.delete', 'snapshot.create', 'snapshot.delete', 'clone.linked'], async () => {
        const v = await fx.create('bparent');
        await be().createSnapshot(v, 'p');
        const c = fx.name('bchild');
        await be().createVolume({ name: c, source: { volume: v, snapshot: 'p' }, mode: 'linked' });
        await expect(be().deleteVolume(v)).rejects.toMatchObject({ code: 'FailedPrecondition' });
        await expect(be().deleteSnapshot(v, 'p')).rejects.toMatchObject({ code: 'FailedPrecondition' });
        expect((await be().getVolume(v))?.name).toBe(v);
        expect((await be().listSnapshots(v)).map((s) => s.name)).toContain('p');
        expect((await be().getVolume(c))?.parent).toBeDefined();
        await be().deleteVolume(c);
        await be().deleteSnapshot(v, 'p');
        await be().deleteVolume(v);
        expect(await be().getVolume(v)).toBeUndefined();
      });

    fx.case('data path: writes read back after reopening, unwritten ranges read as zeros, extents cover the data',
      ['volume.create', 'data.read', 'data.write', 'data.extents'], async () => {
        const v = await fx.create('bio');
        const a = pattern(24, 128 * 1024);
        const b = pattern(25, 64 * 1024);
        const tail = fx.size - b.length;
        const dev = await be().openVolume!(v, 'rw');
        try {
          expect(dev.sizeBytes).toBe((await be().getVolume(v))!.sizeBytes);
          await dev.write(MiB, a);
          await dev.write(tail, b);
          await dev.flush();
          if (dev.writeZeroes) {
            // Zeroing is optional; where offered, it zeroes exactly the range asked.
            await dev.writeZeroes(MiB + 32 * 1024, 32 * 1024);
            a.fill(0, 32 * 1024, 64 * 1024);
          }
        } finally {
          await dev.close();
        }
        const r = await be().openVolume!(v, 'r');
        try {
          expect(same(await r.read(MiB, a.length), a)).toBe(true);
          expect(same(await r.read(tail, b.length), b)).toBe(true);
          expect((await r.read(0, 64 * 1024)).every((x) => x === 0)).toBe(true);
          expect((await r.read(4 * MiB, 64 * 1024)).every((x) => x === 0)).toBe(true);
          const ext = await r.extents();
          let end = 0;
          for (const e of ext) {
            expect(e.offset).toBeGreaterThanOrEqual(end);
            expect(e.length).toBeGreaterThan(0);
            expect(['data', 'zero']).toContain(e.kind);
            end = e.offset + e.length;
          }
          expect(end).toBeLessThanOrEqual(r.sizeBytes);
          const data = ext.filter((e) => e.kind === 'data');
          const covered = (o: number) => data.some((e) => e.offset <= o && o < e.offset + e.length);
          for (const o of [MiB, MiB + a.length - 1, tail, fx.size - 1]) expect(covered(o), `offset ${o}`).toBe(true);
          expect(data.reduce((n, e) => n + e.length, 0)).toBeLessThan(fx.size / 2);
          for (const e of await r.extents(MiB / 2, MiB)) {
            expect(e.offset).toBeGreaterThanOrEqual(MiB / 2);
            expect(e.offset + e.length).toBeLessThanOrEqual(MiB + MiB / 2);
          }
        } finally {
          await r.close();
        }
      });

    fx.case('unaligned and concurrent writes on one device all land; a device opened before sees them',
      ['volume.create', 'data.read', 'data.write'], async () => {
        const v = await fx.create('bconc');
        const early = await be().openVolume!(v, 'r');
        try {
          const dev = await be().openVolume!(v, 'rw');
          try {
            await dev.write(4097, pattern(34, 1000));
            await Promise.all(Array.from({ length: 8 }, (_, i) => dev.write(MiB + i * 96 * 1024, pattern(40 + i, 64 * 1024))));
            await dev.flush();
          } finally {
            await dev.close();
          }
          const around = await early.read(4096, 2048);
          expect(around[0]).toBe(0);
          expect(same(around.subarray(1, 1001), pattern(34, 1000))).toBe(true);
          expect(around.subarray(1001).every((x) => x === 0)).toBe(true);
          for (let i = 0; i < 8; i++) {
            const at = MiB + i * 96 * 1024;
            expect(same(await early.read(at, 64 * 1024), pattern(40 + i, 64 * 1024)), `write ${i}`).toBe(true);
            expect((await early.read(at + 64 * 1024, 32 * 1024)).every((x) => x === 0)).toBe(true);
          }
        } finally {
          await early.close();
        }
      });

    fx.case('I/O past the end is OutOfRange; a read-only or closed device refuses (FailedPrecondition)',
      ['volume.create', 'data.read', 'data.write'], async () => {
        const v = await fx.create('bedge');
        const dev = await be().openVolume!(v, 'rw');
        const size = dev.sizeBytes;
        await expect(dev.read(size - 4096, 8192)).rejects.toMatchObject({ code: 'OutOfRange' });
        await expect(dev.read(size, 1)).rejects.toMatchObject({ code: 'OutOfRange' });
        await expect(dev.read(-512, 512)).rejects.toMatchObject({ code: 'OutOfRange' });
        await expect(dev.write(size - 512, new Uint8Array(1024).fill(7))).rejects.toMatchObject({ code: 'OutOfRange' });
        await dev.write(size - 512, new Uint8Array(512).fill(7));
        await dev.close();
        await expect(dev.read(0, 512)).rejects.toMatchObject({ code: 'FailedPrecondition' });
        const ro = await be().openVolume!(v, 'r');
        try {
          await expect(ro.write(0, new Uint8Array(512).fill(9))).rejects.toMatchObject({ code: 'FailedPrecondition' });
          expect((await ro.read(0, 512)).every((x) => x === 0)).toBe(true);
          expect((await ro.read(size - 512, 512)).every((x) => x === 7)).toBe(true);
        } finally {
          await ro.close();
        }
        await expect(be().openVolume!(fx.name('bghost'), 'r')).rejects.toMatchObject({ code: 'NotFound' });
      });

    fx.case('revertVolume brings back the snapshot; an unknown snapshot or volume is NotFound',
      ['volume.create', 'snapshot.create', 'snapshot.revert'], async () => {
        const v = await fx.create('brevert');
        const hasData = fx.caps.hasAll('data.read', 'data.write');
        if (hasData) await write(v, 0, pattern(26, 8192));
        await be().createSnapshot(v, 'good');
        if (hasData) await write(v, 0, pattern(27, 8192));
        await be().revertVolume(v, 'good');
        if (hasData) expect(same(await read(v, 0, 8192), pattern(26, 8192))).toBe(true);
        expect((await be().getVolume(v))?.sizeBytes).toBeGreaterThanOrEqual(fx.size);
        await expect(be().revertVolume(v, 'missing')).rejects.toMatchObject({ code: 'NotFound' });
        await expect(be().revertVolume(fx.name('bghost'), 'good')).rejects.toMatchObject({ code: 'NotFound' });
      });

    /** A task's params are stored as JSON and must rebuild it; a rebuilt finished task has nothing left to do. */
    const rerun = async (task: JobTask) => {
      expect(JSON.parse(JSON.stringify(task.params))).toEqual(task.params);
      const again = await be().resumeTask?.(task.type, task.params);
      if (again) await runTask(again);
    };

    fx.case('streamVolume gives a task that makes a linked clone independent of its parent',
      ['volume.create', 'volume.delete', 'snapshot.create', 'snapshot.delete', 'clone.linked', 'chain.stream'], async () => {
        const v = await fx.create('bstreamsrc');
        const hasData = fx.caps.hasAll('data.read', 'data.write');
        if (hasData) await write(v, 0, pattern(28, 64 * 1024));
        await be().createSnapshot(v, 's');
        const c = fx.name('bstreamed');
        await be().createVolume({ name: c, source: { volume: v, snapshot: 's' }, mode: 'linked' });
        const task = await be().streamVolume!(c, {});
        expect(task.type).toBe('stream');
        await runTask(task);
        expect((await be().getVolume(c))?.parent).toBeUndefined();
        await rerun(task);
        await be().deleteSnapshot(v, 's');
        await be().deleteVolume(v);
        if (hasData) expect(same(await read(c, 0, 64 * 1024), pattern(28, 64 * 1024))).toBe(true);
        await expect(be().streamVolume!(fx.name('bghost'), {})).rejects.toMatchObject({ code: 'NotFound' });
      });

    // As the pool defines it (the one backend with chain.commit): commit merges the volume into
    // the layer below; when that is a snapshot, `base` names it and the snapshot is given up.
    fx.case('commitVolume gives a task that merges the volume into its snapshot; the data stays, the snapshot goes',
      ['volume.create', 'snapshot.create', 'chain.commit', 'data.read', 'data.write'], async () => {
        const v = await fx.create('bcommit');
        await write(v, 0, pattern(29, 64 * 1024));
        await be().createSnapshot(v, 's');
        await write(v, 32 * 1024, pattern(30, 64 * 1024));
        const task = await be().commitVolume!(v, { base: 's' });
        expect(task.type).toBe('commit');
        await runTask(task);
        expect(same(await read(v, 0, 32 * 1024), pattern(29, 32 * 1024))).toBe(true);
        expect(same(await read(v, 32 * 1024, 64 * 1024), pattern(30, 64 * 1024))).toBe(true);
        expect((await be().listSnapshots(v)).map((s) => s.name)).not.toContain('s');
        await rerun(task);
        expect(same(await read(v, 32 * 1024, 64 * 1024), pattern(30, 64 * 1024))).toBe(true);
        await expect(be().commitVolume!(fx.name('bghost'), {})).rejects.toMatchObject({ code: 'NotFound' });
      });
  });
}
