/**
 * The backend contract: one suite, gated by capabilities, that defines what a backend is. Every
 * backend's test file calls `describeBackendContract` with a few lines (see memory.contract.test.ts).
 * Cases follow csi-sanity: idempotent create, typed errors, pagination, dependents, data, clones.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ContainerModule } from 'inversify';
import { afterAll, beforeAll, describe, expect, it, type TestContext } from 'vitest';
import { createBroker, type Broker, type CapabilitySet } from '../../core/index.js';

export interface ContractSetup {
  plugins: readonly ContainerModule[];
  /** The backend's config entry (name, kind, and its fields). */
  backend: Record<string, unknown> & { name: string; kind: string };
  teardown?: () => Promise<void>;
}

export interface ContractTarget {
  name: string;
  setup: () => Promise<ContractSetup>;
  /** Volume size the suite uses (default 32 MiB); a backend with a larger minimum sets it. */
  sizeBytes?: number;
}

const MiB = 1024 * 1024;

export function describeBackendContract(target: ContractTarget): void {
  describe(`backend contract: ${target.name}`, () => {
    const size = target.sizeBytes ?? 32 * MiB;
    let broker: Broker;
    let caps: CapabilitySet;
    let be: string;
    let setup: ContractSetup;
    let stateDir: string;
    const prefix = `ct${Math.random().toString(36).slice(2, 7)}`;
    let n = 0;
    const made: string[] = [];
    const name = (hint: string) => `${prefix}-${hint}-${n++}`;
    const ref = (v: string) => `${be}/${v}`;
    const need = (ctx: TestContext, ...names: string[]) => {
      if (!caps.hasAll(...names)) ctx.skip(`needs ${names.join(', ')}`);
    };
    const create = async (hint: string, sizeBytes = size) => {
      const v = name(hint);
      made.push(v);
      await broker.volumes.create(ref(v), { sizeBytes });
      return v;
    };
    const clone = async (source: string, hint: string, opts: { mode?: 'linked' | 'full'; sizeBytes?: number } = {}) => {
      const v = name(hint);
      made.push(v);
      await broker.clone(source, ref(v), opts);
      return v;
    };
    const pattern = (seed: number, len: number) => Uint8Array.from({ length: len }, (_, i) => (seed * 31 + i * 7) & 0xff);
    const write = async (v: string, off: number, data: Uint8Array) => {
      const dev = await broker.volumes.open(ref(v), 'rw');
      try {
        await dev.write(off, data);
        await dev.flush();
      } finally {
        await dev.close();
      }
    };
    const read = async (v: string, off: number, len: number) => {
      const dev = await broker.volumes.open(ref(v), 'r');
      try {
        return Buffer.from(await dev.read(off, len));
      } finally {
        await dev.close();
      }
    };

    beforeAll(async () => {
      setup = await target.setup();
      be = setup.backend.name;
      stateDir = mkdtempSync(join(tmpdir(), 'offload-contract-'));
      broker = await createBroker({ state: stateDir, backends: [setup.backend] }, { plugins: setup.plugins });
      caps = (await broker.backends())[0]!.capabilities;
    });

    afterAll(async () => {
      if (broker) {
        // Delete what the suite made, dependents first (retry: clones before their parents).
        for (let round = 0; round < 4 && made.length > 0; round++) {
          for (const v of [...made].reverse()) {
            try {
              for (const s of await broker.snapshots.list(ref(v)).catch(() => [])) {
                await broker.snapshots.delete(`${ref(v)}@${s.name}`).catch(() => undefined);
              }
              await broker.volumes.delete(ref(v));
              made.splice(made.indexOf(v), 1);
            } catch {
              // a dependent still exists; the next round gets it
            }
          }
        }
        await broker.close();
      }
      await setup?.teardown?.();
      if (stateDir) rmSync(stateDir, { recursive: true, force: true });
    });

    it('reports only known capabilities', () => {
      expect(caps.names().length).toBeGreaterThan(0);
      expect(caps.has('no.such.capability')).toBe(false);
    });

    it('creates a volume', async (ctx) => {
      need(ctx, 'volume.create');
      const v = await create('create');
      const got = await broker.volumes.get(ref(v));
      expect(got.name).toBe(v);
      expect(got.backend).toBe(be);
      expect(got.sizeBytes).toBeGreaterThanOrEqual(size);
    });

    it('create again with the same name and size returns the same volume', async (ctx) => {
      need(ctx, 'volume.create');
      const v = await create('idem');
      const again = await broker.volumes.create(ref(v), { sizeBytes: size });
      expect(again.name).toBe(v);
      expect(again.sizeBytes).toBe((await broker.volumes.get(ref(v))).sizeBytes);
    });

    it('create with the same name and another size is AlreadyExists', async (ctx) => {
      need(ctx, 'volume.create');
      const v = await create('conflict');
      const before = (await broker.volumes.get(ref(v))).sizeBytes;
      await expect(broker.volumes.create(ref(v), { sizeBytes: size * 2 })).rejects.toMatchObject({ code: 'AlreadyExists' });
      expect((await broker.volumes.get(ref(v))).sizeBytes).toBe(before);
    });

    it('refuses invalid names and sizes with InvalidArgument', async (ctx) => {
      need(ctx, 'volume.create');
      for (const bad of ['', 'x'.repeat(129), '../x', 'has space', '-lead', '.dot', 'a/b']) {
        await expect(broker.volumes.create(`${be}/${bad}`, { sizeBytes: size }), bad).rejects.toMatchObject({ code: 'InvalidArgument' });
      }
      for (const badSize of [0, -1, Number.NaN, 1.5, '1M' as unknown as number]) {
        await expect(broker.volumes.create(ref(name('badsize')), { sizeBytes: badSize })).rejects.toMatchObject({ code: 'InvalidArgument' });
      }
    });

    it('get and list show a volume; get of an unknown volume is NotFound', async (ctx) => {
      need(ctx, 'volume.create', 'volume.list');
      const v = await create('list');
      const all = await broker.volumes.listAll(be);
      expect(all.filter((x) => x.name === v)).toHaveLength(1);
      await expect(broker.volumes.get(ref(name('nope')))).rejects.toMatchObject({ code: 'NotFound' });
    });

    it('lists more volumes than one page, each exactly once', async (ctx) => {
      need(ctx, 'volume.create', 'volume.list');
      const mine = [];
      for (let i = 0; i < 5; i++) mine.push(await create('page'));
      const seen: string[] = [];
      let token: string | undefined;
      let pages = 0;
      do {
        const page = await broker.volumes.list(be, { limit: 2, ...(token ? { token } : {}) });
        expect(page.items.length).toBeLessThanOrEqual(2);
        seen.push(...page.items.map((x) => x.name));
        token = page.next;
        pages++;
      } while (token && pages < 1000);
      expect(pages).toBeGreaterThan(1);
      for (const v of mine) expect(seen.filter((s) => s === v)).toHaveLength(1);
      expect(new Set(seen).size).toBe(seen.length);
    });

    it('deletes; deleting again or deleting an unknown volume succeeds', async (ctx) => {
      need(ctx, 'volume.create', 'volume.delete');
      const v = await create('delete');
      await broker.volumes.delete(ref(v));
      await expect(broker.volumes.get(ref(v))).rejects.toMatchObject({ code: 'NotFound' });
      await broker.volumes.delete(ref(v));
      await broker.volumes.delete(ref(name('never')));
      // the name is free again
      await broker.volumes.create(ref(v), { sizeBytes: size });
      expect((await broker.volumes.get(ref(v))).sizeBytes).toBeGreaterThanOrEqual(size);
    });

    it('grows a volume; shrinking is OutOfRange', async (ctx) => {
      need(ctx, 'volume.create', 'volume.resize');
      const v = await create('resize');
      const grown = await broker.volumes.resize(ref(v), size * 2);
      expect(grown.sizeBytes).toBeGreaterThanOrEqual(size * 2);
      expect((await broker.volumes.get(ref(v))).sizeBytes).toBeGreaterThanOrEqual(size * 2);
      await expect(broker.volumes.resize(ref(v), size)).rejects.toMatchObject({ code: 'OutOfRange' });
      expect((await broker.volumes.get(ref(v))).sizeBytes).toBeGreaterThanOrEqual(size * 2);
    });

    it('snapshots: create, create again, list, delete, delete again', async (ctx) => {
      need(ctx, 'volume.create', 'snapshot.create', 'snapshot.delete');
      const v = await create('snap');
      const s1 = await broker.snapshots.create(`${ref(v)}@s1`);
      expect(s1.name).toBe('s1');
      expect(s1.volume).toBe(v);
      const again = await broker.snapshots.create(`${ref(v)}@s1`);
      expect(again.name).toBe('s1');
      const list = await broker.snapshots.list(ref(v));
      expect(list.filter((s) => s.name === 's1')).toHaveLength(1);
      await broker.snapshots.delete(`${ref(v)}@s1`);
      expect((await broker.snapshots.list(ref(v))).filter((s) => s.name === 's1')).toHaveLength(0);
      await broker.snapshots.delete(`${ref(v)}@s1`);
    });

    it('a snapshot of an unknown volume is NotFound', async (ctx) => {
      need(ctx, 'snapshot.create');
      await expect(broker.snapshots.create(`${ref(name('ghost'))}@s`)).rejects.toMatchObject({ code: 'NotFound' });
    });

    for (const mode of ['linked', 'full'] as const) {
      it(`clones a snapshot (${mode}) into a larger volume`, async (ctx) => {
        need(ctx, 'volume.create', 'snapshot.create', `clone.${mode}`);
        const v = await create(`src${mode}`);
        await broker.snapshots.create(`${ref(v)}@base`);
        const c = await clone(`${ref(v)}@base`, `c${mode}`, { mode, sizeBytes: size * 2 });
        expect((await broker.volumes.get(ref(c))).sizeBytes).toBeGreaterThanOrEqual(size * 2);
      });

      it(`clones a volume (${mode})`, async (ctx) => {
        need(ctx, 'volume.create', `clone.${mode}`);
        const v = await create(`vsrc${mode}`);
        const c = await clone(ref(v), `vc${mode}`, { mode });
        expect((await broker.volumes.get(ref(c))).sizeBytes).toBeGreaterThanOrEqual(size);
      });

      it(`a ${mode} clone holds the source's data at snapshot time, and writes to it stay there`, async (ctx) => {
        need(ctx, 'volume.create', 'snapshot.create', `clone.${mode}`, 'data.read', 'data.write');
        const v = await create(`data${mode}`);
        const before = pattern(1, 64 * 1024);
        await write(v, 0, before);
        await broker.snapshots.create(`${ref(v)}@t0`);
        await write(v, 0, pattern(2, 64 * 1024));
        const c = await clone(`${ref(v)}@t0`, `dc${mode}`, { mode });
        expect(Buffer.compare(await read(c, 0, before.length), Buffer.from(before))).toBe(0);
        await write(c, 4096, pattern(3, 4096));
        expect(Buffer.compare(await read(v, 0, 64 * 1024), Buffer.from(pattern(2, 64 * 1024)))).toBe(0);
      });
    }

    it('cloning an unknown source is NotFound', async (ctx) => {
      need(ctx, 'volume.create');
      if (!caps.has('clone.linked') && !caps.has('clone.full')) ctx.skip('needs clone.linked or clone.full');
      await expect(broker.clone(ref(name('ghost')), ref(name('c')))).rejects.toMatchObject({ code: 'NotFound' });
      const v = await create('nosnap');
      await expect(broker.clone(`${ref(v)}@nosuch`, ref(name('c')))).rejects.toMatchObject({ code: 'NotFound' });
    });

    it('deleting a volume that has a linked clone is FailedPrecondition and changes nothing', async (ctx) => {
      need(ctx, 'volume.create', 'volume.delete', 'snapshot.create', 'clone.linked');
      const v = await create('parent');
      await broker.snapshots.create(`${ref(v)}@p`);
      const c = await clone(`${ref(v)}@p`, 'child', { mode: 'linked' });
      await expect(broker.volumes.delete(ref(v))).rejects.toMatchObject({ code: 'FailedPrecondition' });
      expect((await broker.volumes.get(ref(v))).name).toBe(v);
      expect((await broker.snapshots.list(ref(v))).map((s) => s.name)).toContain('p');
      expect((await broker.volumes.get(ref(c))).name).toBe(c);
    });

    it('data round trip: a pattern written reads back and shows in the extents', async (ctx) => {
      need(ctx, 'volume.create', 'data.read', 'data.write', 'data.extents');
      const v = await create('data');
      const data = pattern(7, 128 * 1024);
      const off = 1024 * 1024;
      await write(v, off, data);
      expect(Buffer.compare(await read(v, off, data.length), Buffer.from(data))).toBe(0);
      expect((await read(v, 0, 4096)).every((b) => b === 0)).toBe(true);
      const dev = await broker.volumes.open(ref(v), 'r');
      try {
        const ext = (await dev.extents()).filter((e) => e.kind === 'data');
        const covered = (o: number) => ext.some((e) => e.offset <= o && o < e.offset + e.length);
        expect(covered(off)).toBe(true);
        expect(covered(off + data.length - 1)).toBe(true);
      } finally {
        await dev.close();
      }
    });

    it('maps the extents of a whole large volume in one call', async (ctx) => {
      need(ctx, 'volume.create', 'data.read', 'data.write', 'data.extents');
      const big = 1024 * MiB;
      const v = await create('bigmap', big);
      await write(v, big - 64 * 1024, pattern(8, 64 * 1024));
      const dev = await broker.volumes.open(ref(v), 'r');
      try {
        const ext = (await dev.extents()).filter((e) => e.kind === 'data');
        expect(ext.some((e) => e.offset <= big - 1 && big - 1 < e.offset + e.length)).toBe(true);
        expect(ext.reduce((n, e) => n + e.length, 0)).toBeLessThan(big / 2);
      } finally {
        await dev.close();
      }
    });

    it('reverts a volume to a snapshot', async (ctx) => {
      need(ctx, 'volume.create', 'snapshot.create', 'snapshot.revert');
      const v = await create('revert');
      const hasData = caps.hasAll('data.read', 'data.write');
      if (hasData) await write(v, 0, pattern(4, 8192));
      await broker.snapshots.create(`${ref(v)}@good`);
      if (hasData) await write(v, 0, pattern(5, 8192));
      await broker.snapshots.revert(`${ref(v)}@good`);
      if (hasData) expect(Buffer.compare(await read(v, 0, 8192), Buffer.from(pattern(4, 8192)))).toBe(0);
      await expect(broker.snapshots.revert(`${ref(v)}@missing`)).rejects.toMatchObject({ code: 'NotFound' });
    });

    it('concurrent creates of one name make exactly one volume', async (ctx) => {
      need(ctx, 'volume.create', 'volume.list');
      const v = name('race');
      made.push(v);
      const results = await Promise.allSettled(Array.from({ length: 5 }, () => broker.volumes.create(ref(v), { sizeBytes: size })));
      expect(results.filter((r) => r.status === 'fulfilled').length).toBeGreaterThanOrEqual(1);
      for (const r of results) if (r.status === 'rejected') expect((r.reason as { code?: string }).code).toMatch(/AlreadyExists|Busy/);
      expect((await broker.volumes.listAll(be)).filter((x) => x.name === v)).toHaveLength(1);
    });

    it('streams a linked clone so that its parent can be deleted', async (ctx) => {
      need(ctx, 'volume.create', 'volume.delete', 'snapshot.create', 'snapshot.delete', 'clone.linked', 'chain.stream');
      const v = await create('streamsrc');
      const hasData = caps.hasAll('data.read', 'data.write');
      if (hasData) await write(v, 0, pattern(9, 64 * 1024));
      await broker.snapshots.create(`${ref(v)}@s`);
      const c = await clone(`${ref(v)}@s`, 'streamed', { mode: 'linked' });
      const job = await broker.stream(ref(c));
      const info = await job.wait();
      expect(info.error).toBeUndefined();
      expect(info.status).toBe('concluded');
      expect(info.executor).toBe(`backend:${be}`);
      await broker.snapshots.delete(`${ref(v)}@s`);
      await broker.volumes.delete(ref(v));
      made.splice(made.indexOf(v), 1);
      if (hasData) expect(Buffer.compare(await read(c, 0, 64 * 1024), Buffer.from(pattern(9, 64 * 1024)))).toBe(0);
    });
  });
}
