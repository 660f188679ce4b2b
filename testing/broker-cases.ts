/**
 * The broker layer: the contract as users meet it, through `createBroker` and refs. Every case
 * here reaches the backend; what the broker decides on its own before calling it (sizes, shrinking,
 * serialising creates of one name) is checked on the backend itself in backend-cases.ts.
 */
import { describe, expect, type TestContext } from 'vitest';
import { pattern, same, type ContractFixture } from './fixture.js';

export function describeBrokerLayer(fx: ContractFixture): void {
  describe('through the broker', () => {
    const create = async (hint: string, sizeBytes = fx.size) => {
      const v = fx.name(hint);
      await fx.broker.volumes.create(fx.ref(v), { sizeBytes });
      return v;
    };
    const clone = async (source: string, hint: string, opts: { mode?: 'linked' | 'full'; sizeBytes?: number } = {}) => {
      const v = fx.name(hint);
      await fx.broker.clone(source, fx.ref(v), opts);
      return v;
    };
    const write = (v: string, off: number, data: Uint8Array) => fx.write(fx.brokered(v), off, data);
    const read = (v: string, off: number, len: number) => fx.read(fx.brokered(v), off, len);

    fx.case('creates a volume', ['volume.create'], async () => {
      const v = await create('create');
      const got = await fx.broker.volumes.get(fx.ref(v));
      expect(got.name).toBe(v);
      expect(got.backend).toBe(fx.be);
      expect(got.sizeBytes).toBeGreaterThanOrEqual(fx.size);
    });

    fx.case('create again with the same name and size returns the same volume', ['volume.create'], async () => {
      const v = await create('idem');
      const again = await fx.broker.volumes.create(fx.ref(v), { sizeBytes: fx.size });
      expect(again.name).toBe(v);
      expect(again.sizeBytes).toBe((await fx.broker.volumes.get(fx.ref(v))).sizeBytes);
    });

    fx.case('create with the same name and another size is AlreadyExists', ['volume.create'], async () => {
      const v = await create('conflict');
      const before = (await fx.broker.volumes.get(fx.ref(v))).sizeBytes;
      await expect(fx.broker.volumes.create(fx.ref(v), { sizeBytes: fx.size * 2 })).rejects.toMatchObject({ code: 'AlreadyExists' });
      expect((await fx.broker.volumes.get(fx.ref(v))).sizeBytes).toBe(before);
    });

    // Names are the broker's to check (the interface promises backends valid names); this case
    // holds for every backend config, so it stays here.
    fx.case('refuses invalid names with InvalidArgument', ['volume.create'], async () => {
      for (const bad of ['', 'x'.repeat(129), '../x', 'has space', '-lead', '.dot', 'a/b']) {
        await expect(fx.broker.volumes.create(`${fx.be}/${bad}`, { sizeBytes: fx.size }), bad).rejects.toMatchObject({ code: 'InvalidArgument' });
      }
    });

    fx.case('get and list show a volume; get of an unknown volume is NotFound', ['volume.create', 'volume.list'], async () => {
      const v = await create('list');
      const all = await fx.broker.volumes.listAll(fx.be);
      expect(all.filter((x) => x.name === v)).toHaveLength(1);
      await expect(fx.broker.volumes.get(fx.ref(fx.name('nope')))).rejects.toMatchObject({ code: 'NotFound' });
    });

    fx.case('lists more volumes than one page, each exactly once', ['volume.create', 'volume.list'], async () => {
      const mine = [];
      for (let i = 0; i < 5; i++) mine.push(await create('page'));
      const seen: string[] = [];
      let token: string | undefined;
      let pages = 0;
      do {
        const page = await fx.broker.volumes.list(fx.be, { limit: 2, ...(token ? { token } : {}) });
        expect(page.items.length).toBeLessThanOrEqual(2);
        seen.push(...page.items.map((x) => x.name));
        token = page.next;
        pages++;
      } while (token && pages < 1000);
      expect(pages).toBeGreaterThan(1);
      for (const v of mine) expect(seen.filter((s) => s === v)).toHaveLength(1);
      expect(new Set(seen).size).toBe(seen.length);
    });

    fx.case('deletes; deleting again or deleting an unknown volume succeeds', ['volume.create', 'volume.delete'], async () => {
      const v = await create('delete');
      await fx.broker.volumes.delete(fx.ref(v));
      await expect(fx.broker.volumes.get(fx.ref(v))).rejects.toMatchObject({ code: 'NotFound' });
      await fx.broker.volumes.delete(fx.ref(v));
      await fx.broker.volumes.delete(fx.ref(fx.name('never')));
      // the name is free again
      await fx.broker.volumes.create(fx.ref(v), { sizeBytes: fx.size });
      expect((await fx.broker.volumes.get(fx.ref(v))).sizeBytes).toBeGreaterThanOrEqual(fx.size);
    });

    fx.case('grows a volume', ['volume.create', 'volume.resize'], async () => {
      const v = await create('resize');
      const grown = await fx.broker.volumes.resize(fx.ref(v), fx.size * 2);
      expect(grown.sizeBytes).toBeGreaterThanOrEqual(fx.size * 2);
      expect((await fx.broker.volumes.get(fx.ref(v))).sizeBytes).toBeGreaterThanOrEqual(fx.size * 2);
    });

    fx.case('snapshots: create, create again, list, delete, delete again', ['volume.create', 'snapshot.create', 'snapshot.delete'], async () => {
      const v = await create('snap');
      const s1 = await fx.broker.snapshots.create(`${fx.ref(v)}@s1`);
      expect(s1.name).toBe('s1');
      expect(s1.volume).toBe(v);
      const again = await fx.broker.snapshots.create(`${fx.ref(v)}@s1`);
      expect(again.name).toBe('s1');
      const list = await fx.broker.snapshots.list(fx.ref(v));
      expect(list.filter((s) => s.name === 's1')).toHaveLength(1);
      await fx.broker.snapshots.delete(`${fx.ref(v)}@s1`);
      expect((await fx.broker.snapshots.list(fx.ref(v))).filter((s) => s.name === 's1')).toHaveLength(0);
      await fx.broker.snapshots.delete(`${fx.ref(v)}@s1`);
    });

    fx.case('a snapshot of an unknown volume is NotFound', ['snapshot.create'], async () => {
      await expect(fx.broker.snapshots.create(`${fx.ref(fx.name('ghost'))}@s`)).rejects.toMatchObject({ code: 'NotFound' });
    });

    for (const mode of ['linked', 'full'] as const) {
      // A linked clone needs the backend's own; a full one is whatever the broker can make: the
      // backend's clone.full, or a copy through the host over the data path (its plan says which).
      const needs = (...caps: string[]) => (mode === 'linked' ? [...caps, 'clone.linked'] : caps);
      const canClone = async (ctx: TestContext, source: string) => {
        if (mode === 'linked') return;
        const plan = await fx.broker.plan({ op: 'clone', source, target: fx.ref('plan-probe'), mode });
        if (!plan.supported) ctx.skip(`the broker cannot make a full clone here: ${plan.reason}`);
      };

      fx.case(`clones a snapshot (${mode}) into a larger volume`, needs('volume.create', 'snapshot.create'), async (ctx) => {
        await canClone(ctx, `${fx.ref('probe')}@s`);
        const v = await create(`src${mode}`);
        await fx.broker.snapshots.create(`${fx.ref(v)}@base`);
        const c = await clone(`${fx.ref(v)}@base`, `c${mode}`, { mode, sizeBytes: fx.size * 2 });
        expect((await fx.broker.volumes.get(fx.ref(c))).sizeBytes).toBeGreaterThanOrEqual(fx.size * 2);
      });

      fx.case(`clones a volume (${mode})`, needs('volume.create'), async (ctx) => {
        await canClone(ctx, fx.ref('probe'));
        const v = await create(`vsrc${mode}`);
        const c = await clone(fx.ref(v), `vc${mode}`, { mode });
        expect((await fx.broker.volumes.get(fx.ref(c))).sizeBytes).toBeGreaterThanOrEqual(fx.size);
      });

      fx.case(`a ${mode} clone holds the source's data at snapshot time, and writes to it stay there`,
        needs('volume.create', 'snapshot.create', 'data.read', 'data.write'), async (ctx) => {
          await canClone(ctx, `${fx.ref('probe')}@s`);
          const v = await create(`data${mode}`);
          const before = pattern(1, 64 * 1024);
          await write(v, 0, before);
          await fx.broker.snapshots.create(`${fx.ref(v)}@t0`);
          await write(v, 0, pattern(2, 64 * 1024));
          const c = await clone(`${fx.ref(v)}@t0`, `dc${mode}`, { mode });
          expect(same(await read(c, 0, before.length), before)).toBe(true);
          await write(c, 4096, pattern(3, 4096));
          expect(same(await read(v, 0, 64 * 1024), pattern(2, 64 * 1024))).toBe(true);
        });
    }

    fx.case('cloning an unknown source is NotFound', ['volume.create'], async (ctx) => {
      if (!(await fx.broker.plan({ op: 'clone', source: fx.ref('probe'), target: fx.ref('plan-probe') })).supported) ctx.skip('the broker cannot clone here');
      await expect(fx.broker.clone(fx.ref(fx.name('ghost')), fx.ref(fx.name('c')))).rejects.toMatchObject({ code: 'NotFound' });
      if (!(await fx.broker.plan({ op: 'clone', source: `${fx.ref('probe')}@s`, target: fx.ref('plan-probe') })).supported) return;
      const v = await create('nosnap');
      await expect(fx.broker.clone(`${fx.ref(v)}@nosuch`, fx.ref(fx.name('c')))).rejects.toMatchObject({ code: 'NotFound' });
    });

    fx.case('deleting a volume that has a linked clone is FailedPrecondition and changes nothing',
      ['volume.create', 'volume.delete', 'snapshot.create', 'clone.linked'], async () => {
        const v = await create('parent');
        await fx.broker.snapshots.create(`${fx.ref(v)}@p`);
        const c = await clone(`${fx.ref(v)}@p`, 'child', { mode: 'linked' });
        await expect(fx.broker.volumes.delete(fx.ref(v))).rejects.toMatchObject({ code: 'FailedPrecondition' });
        expect((await fx.broker.volumes.get(fx.ref(v))).name).toBe(v);
        expect((await fx.broker.snapshots.list(fx.ref(v))).map((s) => s.name)).toContain('p');
        expect((await fx.broker.volumes.get(fx.ref(c))).name).toBe(c);
      });

    fx.case('data round trip: a pattern written reads back and shows in the extents',
      ['volume.create', 'data.read', 'data.write', 'data.extents'], async () => {
        const v = await create('data');
        const data = pattern(7, 128 * 1024);
        const off = 1024 * 1024;
        await write(v, off, data);
        expect(same(await read(v, off, data.length), data)).toBe(true);
        expect((await read(v, 0, 4096)).every((b) => b === 0)).toBe(true);
        const dev = await fx.broker.volumes.open(fx.ref(v), 'r');
        try {
          const ext = (await dev.extents()).filter((e) => e.kind === 'data');
          const covered = (o: number) => ext.some((e) => e.offset <= o && o < e.offset + e.length);
          expect(covered(off)).toBe(true);
          expect(covered(off + data.length - 1)).toBe(true);
        } finally {
          await dev.close();
        }
      });

    fx.case('reverts a volume to a snapshot', ['volume.create', 'snapshot.create', 'snapshot.revert'], async () => {
      const v = await create('revert');
      const hasData = fx.caps.hasAll('data.read', 'data.write');
      if (hasData) await write(v, 0, pattern(4, 8192));
      await fx.broker.snapshots.create(`${fx.ref(v)}@good`);
      if (hasData) await write(v, 0, pattern(5, 8192));
      await fx.broker.snapshots.revert(`${fx.ref(v)}@good`);
      if (hasData) expect(same(await read(v, 0, 8192), pattern(4, 8192))).toBe(true);
      await expect(fx.broker.snapshots.revert(`${fx.ref(v)}@missing`)).rejects.toMatchObject({ code: 'NotFound' });
    });

    fx.case('streams a linked clone so that its parent can be deleted',
      ['volume.create', 'volume.delete', 'snapshot.create', 'snapshot.delete', 'clone.linked', 'chain.stream'], async () => {
        const v = await create('streamsrc');
        const hasData = fx.caps.hasAll('data.read', 'data.write');
        if (hasData) await write(v, 0, pattern(9, 64 * 1024));
        await fx.broker.snapshots.create(`${fx.ref(v)}@s`);
        const c = await clone(`${fx.ref(v)}@s`, 'streamed', { mode: 'linked' });
        const info = await (await fx.broker.stream(fx.ref(c))).wait();
        expect(info.error).toBeUndefined();
        expect(info.status).toBe('concluded');
        expect(info.executor).toBe(`backend:${fx.be}`);
        await fx.broker.snapshots.delete(`${fx.ref(v)}@s`);
        await fx.broker.volumes.delete(fx.ref(v));
        if (hasData) expect(same(await read(c, 0, 64 * 1024), pattern(9, 64 * 1024))).toBe(true);
      });

    // The pool's rule (the one backend with chain.commit): merging into a snapshot's layer gives
    // up that snapshot, so the caller names it as `base`.
    fx.case('commits a volume into its snapshot: the data reads back and the snapshot is gone',
      ['volume.create', 'snapshot.create', 'chain.commit', 'data.read', 'data.write'], async () => {
        const v = await create('commit');
        await write(v, 0, pattern(10, 64 * 1024));
        await fx.broker.snapshots.create(`${fx.ref(v)}@s`);
        await write(v, 32 * 1024, pattern(11, 64 * 1024));
        const info = await (await fx.broker.commit(fx.ref(v), { base: 's' })).wait();
        expect(info.error).toBeUndefined();
        expect(info.status).toBe('concluded');
        expect(info.executor).toBe(`backend:${fx.be}`);
        expect(same(await read(v, 0, 32 * 1024), pattern(10, 64 * 1024).subarray(0, 32 * 1024))).toBe(true);
        expect(same(await read(v, 32 * 1024, 64 * 1024), pattern(11, 64 * 1024))).toBe(true);
        expect((await fx.broker.snapshots.list(fx.ref(v))).map((s) => s.name)).not.toContain('s');
        expect((await fx.broker.volumes.get(fx.ref(v))).parent).toBeUndefined();
      });
  });
}
