/**
 * The backend layer, part 1: capabilities and volumes, calling the StorageBackend directly. The
 * broker checks sizes, refuses shrinking and serialises creates of one name before a backend
 * sees them, so those promises of the interface are only tested here.
 */
import { describe, expect } from 'vitest';
import { CAPABILITIES, isValidName, type StorageBackend, type Volume } from '../core/index.js';
import type { ContractFixture } from './fixture.js';

/** The method each capability needs: a capability without it cannot work. */
const METHODS: Record<(typeof CAPABILITIES)[number], readonly (keyof StorageBackend)[]> = {
  'volume.create': ['createVolume', 'getVolume'],
  'volume.delete': ['deleteVolume'],
  'volume.resize': ['resizeVolume'],
  'volume.list': ['listVolumes'],
  'snapshot.create': ['createSnapshot', 'listSnapshots'],
  'snapshot.delete': ['deleteSnapshot'],
  'snapshot.revert': ['revertVolume'],
  'clone.linked': ['createVolume'],
  'clone.full': ['createVolume'],
  'chain.stream': ['streamVolume'],
  'chain.commit': ['commitVolume'],
  'data.read': ['openVolume'],
  'data.write': ['openVolume'],
  'data.extents': ['openVolume'],
  'data.dirty': ['changedExtents'],
};

/** Sizes no backend may accept: not a positive whole number of bytes. */
const BAD_SIZES: readonly unknown[] = [0, -1, Number.NaN, 1.5, '1M', Number.POSITIVE_INFINITY, -4096];

export function describeBackendVolumes(fx: ContractFixture): void {
  describe('on the backend directly: capabilities and volumes', () => {
    const be = () => fx.backend;
    const listAll = async () => {
      const out: Volume[] = [];
      let token: string | undefined;
      for (let pages = 0; pages < 1000; pages++) {
        const page = await be().listVolumes(token === undefined ? undefined : { token });
        out.push(...page.items);
        token = page.next;
        if (token === undefined) return out;
      }
      throw new Error('listVolumes did not end after 1000 pages');
    };

    fx.case('reports only known capabilities, each backed by the method it needs', [], async () => {
      const names = fx.caps.names();
      expect(names.length).toBeGreaterThan(0);
      expect(new Set(names).size).toBe(names.length);
      for (const n of [...names, ...Object.keys(fx.caps.toJSON())]) expect(CAPABILITIES, `unknown capability ${n}`).toContain(n);
      expect(fx.caps.has('no.such.capability')).toBe(false);
      for (const n of names) {
        for (const m of METHODS[n]) expect(typeof be()[m], `${n} needs ${String(m)}`).toBe('function');
        for (const [k, v] of Object.entries(fx.caps.limits(n) ?? {})) {
          if (k === 'maxSizeBytes' || k === 'sizeGranularity' || k === 'maxNameLength') {
            expect(Number.isSafeInteger(v) && (v as number) > 0, `${n} limit ${k} = ${String(v)}`).toBe(true);
          }
          if (k === 'namePattern') expect(() => new RegExp(String(v))).not.toThrow();
        }
      }
      // Asked again, and as the broker reports them: the same set.
      expect((await be().capabilities()).names()).toEqual(names);
      expect((await fx.broker.backends())[0]!.capabilities.names()).toEqual(names);
      expect(be().name).toBe(fx.be);
    });

    fx.case('createVolume makes a volume that getVolume returns; an unknown volume is undefined', ['volume.create'], async () => {
      const v = fx.name('bcreate');
      const asked = fx.size + 1; // not a multiple of anything: the backend rounds up or keeps it
      const made = await be().createVolume({ name: v, sizeBytes: asked });
      expect(made).toMatchObject({ backend: fx.be, name: v });
      expect(made.sizeBytes).toBeGreaterThanOrEqual(asked);
      const granularity = fx.caps.limits('volume.create')?.sizeGranularity;
      if (granularity) expect(made.sizeBytes % granularity).toBe(0);
      expect(made.parent).toBeUndefined();
      expect(await be().getVolume(v)).toMatchObject({ backend: fx.be, name: v, sizeBytes: made.sizeBytes });
      expect(await be().getVolume(fx.name('bnope'))).toBeUndefined();
    });

    fx.case('a volume\'s id, where the backend gives one, is what getVolume and listVolumes say, and a volume deleted and made again at once under its name has another', ['volume.create', 'volume.delete'], async () => {
      const v = fx.name('bid');
      const made = await be().createVolume({ name: v, sizeBytes: fx.size });
      expect((await be().getVolume(v))?.id).toBe(made.id);
      if (fx.caps.has('volume.list')) expect((await listAll()).find((x) => x.name === v)?.id).toBe(made.id);
      await be().deleteVolume(v);
      const again = await be().createVolume({ name: v, sizeBytes: fx.size });
      if (made.id === undefined) {
        expect(again.id).toBeUndefined(); // ids are optional, but given always or never
        return;
      }
      expect(typeof made.id).toBe('string');
      expect(again.id).not.toBe(made.id);
      expect((await be().getVolume(v))?.id).toBe(again.id);
    });

    fx.case('createVolume again: the same size is the same volume, another size AlreadyExists and nothing changes', ['volume.create'], async () => {
      const v = fx.name('bidem');
      const first = await be().createVolume({ name: v, sizeBytes: fx.size });
      const again = await be().createVolume({ name: v, sizeBytes: fx.size });
      expect(again).toMatchObject({ name: v, sizeBytes: first.sizeBytes });
      await expect(be().createVolume({ name: v, sizeBytes: fx.size * 2 })).rejects.toMatchObject({ code: 'AlreadyExists' });
      expect((await be().getVolume(v))?.sizeBytes).toBe(first.sizeBytes);
    });

    fx.case('concurrent createVolume calls of one name make exactly one volume', ['volume.create', 'volume.list'], async () => {
      const v = fx.name('brace');
      const results = await Promise.allSettled(Array.from({ length: 5 }, () => be().createVolume({ name: v, sizeBytes: fx.size })));
      const ok = results.filter((r) => r.status === 'fulfilled').map((r) => r.value);
      expect(ok.length).toBeGreaterThanOrEqual(1);
      for (const r of results) if (r.status === 'rejected') expect((r.reason as { code?: string }).code).toMatch(/^(AlreadyExists|Busy)$/);
      expect(new Set(ok.map((x) => x.sizeBytes)).size).toBe(1);
      expect((await listAll()).filter((x) => x.name === v)).toHaveLength(1);
    });

    fx.case('concurrent createVolume calls of one name with different sizes: one wins, the others are AlreadyExists', ['volume.create', 'volume.list'], async () => {
      const v = fx.name('bclash');
      const sizes = [1, 2, 3].map((k) => fx.size * k);
      const results = await Promise.allSettled(sizes.map((sizeBytes) => be().createVolume({ name: v, sizeBytes })));
      const ok = results.filter((r) => r.status === 'fulfilled').map((r) => r.value);
      expect(ok).toHaveLength(1);
      for (const r of results) if (r.status === 'rejected') expect((r.reason as { code?: string }).code).toBe('AlreadyExists');
      expect((await be().getVolume(v))?.sizeBytes).toBe(ok[0]!.sizeBytes);
      expect((await listAll()).filter((x) => x.name === v)).toHaveLength(1);
    });

    fx.case('invalid sizes are InvalidArgument from the backend, and nothing is created', ['volume.create'], async () => {
      for (const bad of BAD_SIZES) {
        const v = fx.name('bbadsize');
        await expect(be().createVolume({ name: v, sizeBytes: bad as number }), String(bad)).rejects.toMatchObject({ code: 'InvalidArgument' });
        expect(await be().getVolume(v)).toBeUndefined();
      }
      const v = fx.name('bnosize');
      await expect(be().createVolume({ name: v })).rejects.toMatchObject({ code: 'InvalidArgument' });
      expect(await be().getVolume(v)).toBeUndefined();
    });

    fx.case('a size above the reported maximum is refused, and nothing is created', ['volume.create'], async () => {
      const max = fx.caps.limits('volume.create')?.maxSizeBytes ?? Number.MAX_SAFE_INTEGER;
      const v = fx.name('bhuge');
      const over = max >= Number.MAX_SAFE_INTEGER - 1 ? Number.MAX_SAFE_INTEGER + 1 : max + 1;
      // The broker's pre-check says InvalidArgument; CSI says OUT_OF_RANGE for a capacity a
      // backend cannot provide. Either is a refusal that names the reason.
      await expect(be().createVolume({ name: v, sizeBytes: over })).rejects.toMatchObject({ code: expect.stringMatching(/^(InvalidArgument|OutOfRange)$/) });
      expect(await be().getVolume(v)).toBeUndefined();
    });

    // A backend may hold fewer names than the broker allows; it says so in its limits, and then
    // refuses the others itself. Without limits it holds every name the broker lets through.
    fx.case('accepts every broker-valid name within its reported limits and refuses the others with InvalidArgument', ['volume.create'], async () => {
      const limits = fx.caps.limits('volume.create') ?? {};
      const maxLen = typeof limits.maxNameLength === 'number' ? limits.maxNameLength : 128;
      const pattern = typeof limits.namePattern === 'string' ? new RegExp(limits.namePattern) : /^/;
      const base = fx.name('bnm');
      const candidates = [`${base}.dot`, `${base}_u`, `9${base}`, base.padEnd(128, 'x'), base.padEnd(maxLen, 'y'), base.padEnd(maxLen + 1, 'z')];
      for (const v of candidates.filter((c) => isValidName(c))) {
        fx.track(v);
        if (v.length <= maxLen && pattern.test(v)) {
          expect((await be().createVolume({ name: v, sizeBytes: fx.size })).name, v).toBe(v);
          expect((await be().getVolume(v))?.name).toBe(v);
        } else {
          await expect(be().createVolume({ name: v, sizeBytes: fx.size }), v).rejects.toMatchObject({ code: 'InvalidArgument' });
          expect(await be().getVolume(v)).toBeUndefined();
        }
      }
    });

    fx.case('listVolumes pages with tokens, each volume exactly once; a bad token is InvalidArgument', ['volume.create', 'volume.list'], async () => {
      const mine: string[] = [];
      for (let i = 0; i < 5; i++) mine.push(await fx.create('bpage'));
      const seen: string[] = [];
      let token: string | undefined;
      let pages = 0;
      do {
        const page = await be().listVolumes({ limit: 2, ...(token === undefined ? {} : { token }) });
        expect(page.items.length).toBeLessThanOrEqual(2);
        for (const item of page.items) expect(item.backend).toBe(fx.be);
        seen.push(...page.items.map((x) => x.name));
        token = page.next;
        pages++;
      } while (token !== undefined && pages < 1000);
      expect(pages).toBeGreaterThan(2);
      for (const v of mine) expect(seen.filter((s) => s === v)).toHaveLength(1);
      expect(new Set(seen).size).toBe(seen.length);
      await expect(be().listVolumes({ token: 'not a token!' })).rejects.toMatchObject({ code: 'InvalidArgument' });
    });

    fx.case('resizeVolume grows; shrinking is OutOfRange from the backend and changes nothing', ['volume.create', 'volume.resize'], async () => {
      const v = await fx.create('bresize');
      const grown = await be().resizeVolume(v, fx.size * 2);
      expect(grown).toMatchObject({ name: v });
      expect(grown.sizeBytes).toBeGreaterThanOrEqual(fx.size * 2);
      expect((await be().getVolume(v))?.sizeBytes).toBe(grown.sizeBytes);
      expect((await be().resizeVolume(v, grown.sizeBytes)).sizeBytes).toBe(grown.sizeBytes);
      await expect(be().resizeVolume(v, fx.size)).rejects.toMatchObject({ code: 'OutOfRange' });
      expect((await be().getVolume(v))?.sizeBytes).toBe(grown.sizeBytes);
      for (const bad of BAD_SIZES) {
        await expect(be().resizeVolume(v, bad as number), String(bad)).rejects.toMatchObject({ code: 'InvalidArgument' });
      }
      expect((await be().getVolume(v))?.sizeBytes).toBe(grown.sizeBytes);
      await expect(be().resizeVolume(fx.name('bghost'), fx.size * 2)).rejects.toMatchObject({ code: 'NotFound' });
    });

    fx.case('deleteVolume: the volume is gone, deleting again or an unknown volume succeeds, the name is free', ['volume.create', 'volume.delete'], async () => {
      const v = await fx.create('bdelete');
      await be().deleteVolume(v);
      expect(await be().getVolume(v)).toBeUndefined();
      await be().deleteVolume(v);
      await be().deleteVolume(fx.name('bnever'));
      const again = await be().createVolume({ name: v, sizeBytes: fx.size * 2 });
      expect(again.sizeBytes).toBeGreaterThanOrEqual(fx.size * 2);
    });
  });
}
