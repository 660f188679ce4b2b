/**
 * The backend layer, part 3: changed-block tracking (`data.dirty`), calling the StorageBackend
 * directly. Every byte written between two points is reported (never under-report), nothing far
 * from a write is (exact up to the granularity the backend reports), answers are clipped to the
 * range asked, errors are typed, and applying the reported extents of the volume onto a copy of
 * the earlier snapshot gives the volume back byte for byte.
 */
import { describe, expect } from 'vitest';
import type { ChangedExtents, ChangedExtentsRequest } from '../core/index.js';
import { MiB, pattern, same, type ContractFixture } from './fixture.js';

interface Range { offset: number; length: number }

/** A volume written, snapshotted `s1`, written, snapshotted `s2`, written again; and what each point holds. */
interface Scenario {
  v: string;
  size: number;
  /** The writes between s1 and s2, and between s2 and now. */
  w12: Range[];
  w2n: Range[];
  /** What the volume holds at s1, at s2 and now, as the writes imply. */
  at: { s1: Buffer; s2: Buffer; now: Buffer };
}

const KiB = 1024;

export function describeBackendDirty(fx: ContractFixture): void {
  describe('on the backend directly: changed-block tracking (data.dirty)', () => {
    const be = () => fx.backend;
    const changed = (v: string, req: ChangedExtentsRequest) => be().changedExtents!(v, req);
    const needs = ['volume.create', 'snapshot.create', 'data.read', 'data.write', 'data.dirty'] as const;

    /** Write `data` at `offset` on the volume and into `model`; zeroes through writeZeroes when asked and offered. */
    async function put(v: string, model: Buffer, offset: number, data: Uint8Array, zeroes = false): Promise<Range> {
      const dev = await be().openVolume!(v, 'rw');
      try {
        if (zeroes && dev.writeZeroes && data.every((b) => b === 0)) await dev.writeZeroes(offset, data.length);
        else await dev.write(offset, data);
        await dev.flush();
      } finally {
        await dev.close();
      }
      model.set(data, offset);
      return { offset, length: data.length };
    }

    async function scenario(hint: string): Promise<Scenario> {
      const v = await fx.create(hint);
      const size = (await be().getVolume(v))!.sizeBytes;
      const now = Buffer.alloc(size);
      await put(v, now, 0, pattern(60, 256 * KiB));
      await put(v, now, 4 * MiB, pattern(61, 256 * KiB));
      await put(v, now, 8 * MiB, pattern(62, 128 * KiB));
      await be().createSnapshot(v, 's1');
      const s1 = Buffer.from(now);
      const w12 = [
        await put(v, now, 4 * MiB + 64 * KiB, new Uint8Array(64 * KiB)), // zeros written over data
        await put(v, now, 8 * MiB, new Uint8Array(32 * KiB), true), // zeroed over data (writeZeroes where offered)
        await put(v, now, 12 * MiB + 1000, pattern(63, 5000)), // into a hole, unaligned
        await put(v, now, 100, pattern(64, 10)), // a small part of an allocated block
      ];
      await be().createSnapshot(v, 's2');
      const s2 = Buffer.from(now);
      const w2n = [
        await put(v, now, 20 * MiB, pattern(65, 4096)),
        await put(v, now, 200, pattern(66, 10)),
        await put(v, now, size - 64 * KiB, pattern(67, 64 * KiB)),
      ];
      return { v, size, w12, w2n, at: { s1, s2, now } };
    }

    fx.case('changedExtents reports every write between two snapshots and since a snapshot, and nothing far from them',
      needs, async () => {
        const sc = await scenario('dirty');
        const whole = { offset: 0, length: sc.size };
        const a12 = await changed(sc.v, { since: 's1', until: 's2' });
        const a1n = await changed(sc.v, { since: 's1' });
        const a2n = await changed(sc.v, { since: 's2' });
        for (const [answer, writes, label] of [[a12, sc.w12, 's1→s2'], [a1n, [...sc.w12, ...sc.w2n], 's1→now'], [a2n, sc.w2n, 's2→now']] as const) {
          checkShape(answer, whole, sc.size, label);
          expectCovers(answer, writes, whole, label);
          expectWithin(answer, writes, label);
        }
        // Far from every write: a range nothing touched, and what came after s2 is not in s1→s2.
        expect(overlaps(a12.extents, { offset: 16 * MiB, length: 4 * MiB })).toBe(false);
        expect(overlaps(a12.extents, { offset: 20 * MiB, length: 4096 })).toBe(false);
        expect(overlaps(a2n.extents, { offset: 12 * MiB, length: 8192 })).toBe(false);
        // Never under-report, checked on the bytes: outside the s1→s2 answer, s1 and s2 hold the same.
        expectSameOutside(a12, sc.at.s1, sc.at.s2);
        expectSameOutside(a1n, sc.at.s1, sc.at.now);
      });

    fx.case('incremental equals full: the volume\'s data at the changed extents, applied onto a copy of s1, is the volume',
      needs, async () => {
        const sc = await scenario('dirtyinc');
        // A copy of s1's data: read from the snapshot where the backend can, else what the writes imply.
        let copy = Buffer.from(sc.at.s1);
        if (be().openSnapshot) {
          const snap = await be().openSnapshot!(sc.v, 's1');
          try {
            copy = Buffer.from(await snap.read(0, sc.size));
          } finally {
            await snap.close();
          }
          expect(same(copy, sc.at.s1), 's1 read back as written').toBe(true);
        }
        const answer = await changed(sc.v, { since: 's1' });
        const dev = await be().openVolume!(sc.v, 'r');
        try {
          let moved = 0;
          for (const e of answer.extents) {
            copy.set(await dev.read(e.offset, e.length), e.offset);
            moved += e.length;
          }
          const full = Buffer.from(await dev.read(0, sc.size));
          expect(same(full, sc.at.now), 'the volume holds what was written').toBe(true);
          expect(same(copy, full), 's1 + changed extents = the volume').toBe(true);
          expect(moved).toBeLessThan(sc.size / 4);
        } finally {
          await dev.close();
        }
      });

    fx.case('changedExtents answers within the range asked (offset, length), clipped to the volume',
      needs, async () => {
        const sc = await scenario('dirtyrange');
        const all = [...sc.w12, ...sc.w2n];
        const full = await changed(sc.v, { since: 's1' });
        const ranges: (Range & { req: Partial<Range> })[] = [
          { req: { offset: 4 * MiB + 100, length: 192 * KiB + 7 }, offset: 4 * MiB + 100, length: 192 * KiB + 7 },
          { req: { offset: 50, length: 100 }, offset: 50, length: 100 },
          { req: { offset: 20 * MiB }, offset: 20 * MiB, length: sc.size - 20 * MiB },
          { req: { length: MiB }, offset: 0, length: MiB },
          { req: { offset: sc.size - 1000, length: 1 << 30 }, offset: sc.size - 1000, length: 1000 },
        ];
        for (const r of ranges) {
          const label = `range ${JSON.stringify(r.req)}`;
          const a = await changed(sc.v, { since: 's1', ...r.req });
          checkShape(a, r, sc.size, label);
          expectCovers(a, all, r, label);
          expectWithin(a, all, label);
          expect(a.extents, `${label}: the whole answer clipped to the range`).toEqual(clip(full.extents, r));
        }
        for (const req of [{ offset: 16 * MiB, length: 4 * MiB }, { offset: sc.size }, { offset: 0, length: 0 }, { offset: 4 * MiB, length: 0 }]) {
          expect((await changed(sc.v, { since: 's1', ...req })).extents, JSON.stringify(req)).toEqual([]);
        }
        await expect(changed(sc.v, { since: 's1', offset: -512 })).rejects.toMatchObject({ code: expect.stringMatching(/^(InvalidArgument|OutOfRange)$/) });
        await expect(changed(sc.v, { since: 's1', length: 1.5 })).rejects.toMatchObject({ code: expect.stringMatching(/^(InvalidArgument|OutOfRange)$/) });
      });

    fx.case('changedExtents: an unknown volume or snapshot is NotFound, until older than since is InvalidArgument, the same snapshot twice is no change',
      ['volume.create', 'snapshot.create', 'data.dirty'], async () => {
        const v = await fx.create('dirtyerr');
        const size = (await be().getVolume(v))!.sizeBytes;
        await be().createSnapshot(v, 'old');
        if (fx.caps.has('data.write')) await fx.write(fx.direct(v), MiB, pattern(68, 64 * KiB));
        await be().createSnapshot(v, 'new');
        const other = await fx.create('dirtyother');
        await be().createSnapshot(other, 'theirs');
        await expect(changed(v, { since: 'nosuch' })).rejects.toMatchObject({ code: 'NotFound' });
        await expect(changed(v, { since: 'old', until: 'nosuch' })).rejects.toMatchObject({ code: 'NotFound' });
        await expect(changed(v, { since: 'nosuch', until: 'new' })).rejects.toMatchObject({ code: 'NotFound' });
        await expect(changed(v, { since: 'theirs' })).rejects.toMatchObject({ code: 'NotFound' }); // another volume's snapshot
        await expect(changed(fx.name('dirtyghost'), { since: 'old' })).rejects.toMatchObject({ code: 'NotFound' });
        await expect(changed(v, { since: 'new', until: 'old' })).rejects.toMatchObject({ code: 'InvalidArgument' });
        for (const s of ['old', 'new']) {
          const none = await changed(v, { since: s, until: s });
          expect(none.extents, `${s}→${s}`).toEqual([]);
          expect(none.sizeBytes).toBe(size);
        }
        const moved = await changed(v, { since: 'old', until: 'new' });
        if (fx.caps.has('data.write')) expect(moved.extents.length).toBeGreaterThan(0);
        if (fx.caps.has('snapshot.delete')) {
          await be().deleteSnapshot(v, 'old');
          await expect(changed(v, { since: 'old' })).rejects.toMatchObject({ code: 'NotFound' });
        }
      });

    fx.case('a volume grown after the snapshot: sizeBytes is its size now, a write past the old end is reported',
      [...needs, 'volume.resize'], async () => {
        const v = await fx.create('dirtygrow');
        const before = (await be().getVolume(v))!.sizeBytes;
        await be().createSnapshot(v, 'small');
        const after = (await be().resizeVolume(v, before * 2)).sizeBytes;
        const w = { offset: before + 3 * MiB, length: 8192 };
        await fx.write(fx.direct(v), w.offset, pattern(69, w.length));
        const a = await changed(v, { since: 'small' });
        expect(a.sizeBytes).toBe(after);
        checkShape(a, { offset: 0, length: after }, after, 'grown');
        expectCovers(a, [w], { offset: 0, length: after }, 'grown');
        expectWithin(a, [w], 'grown');
      });
  });
}

/** Sorted, apart, inside the range and the size, in whole granules except where clipped to the range. */
function checkShape(a: ChangedExtents, range: Range, size: number, label: string): void {
  expect(a.sizeBytes, `${label}: sizeBytes`).toBe(size);
  const g = a.granularity;
  expect(Number.isSafeInteger(g) && g > 0, `${label}: granularity ${g}`).toBe(true);
  const start = Math.min(range.offset, size);
  const end = Math.min(size, range.offset + range.length);
  let prev = start;
  for (const e of a.extents) {
    expect(Number.isSafeInteger(e.offset) && Number.isSafeInteger(e.length), `${label}: whole numbers`).toBe(true);
    expect(e.length, `${label}: extent at ${e.offset} is empty`).toBeGreaterThan(0);
    expect(e.offset, `${label}: extents sorted, apart, inside the range`).toBeGreaterThanOrEqual(prev);
    expect(e.offset + e.length, `${label}: inside the range`).toBeLessThanOrEqual(end);
    expect(e.offset % g === 0 || e.offset === start, `${label}: extent at ${e.offset} starts on a granule`).toBe(true);
    expect((e.offset + e.length) % g === 0 || e.offset + e.length === end, `${label}: extent at ${e.offset} ends on a granule`).toBe(true);
    prev = e.offset + e.length;
  }
}

/** Every written byte inside the range is inside an extent. */
function expectCovers(a: ChangedExtents, writes: readonly Range[], range: Range, label: string): void {
  for (const w of clip(writes, range)) {
    let pos = w.offset;
    for (const e of a.extents) if (e.offset <= pos && pos < e.offset + e.length) pos = Math.min(w.offset + w.length, e.offset + e.length);
    expect(pos, `${label}: write ${w.offset}+${w.length} is covered`).toBe(w.offset + w.length);
  }
}

/** Every extent lies within the writes widened to whole granules: nothing far from a write is reported. */
function expectWithin(a: ChangedExtents, writes: readonly Range[], label: string): void {
  const g = a.granularity;
  const widened = merge(writes.map((w) => {
    const s = Math.floor(w.offset / g) * g;
    return { offset: s, length: Math.ceil((w.offset + w.length) / g) * g - s };
  }));
  for (const e of a.extents) {
    const ok = widened.some((w) => w.offset <= e.offset && e.offset + e.length <= w.offset + w.length);
    expect(ok, `${label}: extent ${e.offset}+${e.length} is near a write (granularity ${g})`).toBe(true);
  }
}

/** Outside the extents the two images hold the same bytes. */
function expectSameOutside(a: ChangedExtents, before: Buffer, after: Buffer): void {
  let pos = 0;
  for (const e of [...a.extents, { offset: a.sizeBytes, length: 0 }]) {
    expect(same(before.subarray(pos, e.offset), after.subarray(pos, e.offset)), `bytes ${pos}..${e.offset} are unchanged`).toBe(true);
    pos = e.offset + e.length;
  }
}

function overlaps(extents: readonly Range[], r: Range): boolean {
  return extents.some((e) => e.offset < r.offset + r.length && r.offset < e.offset + e.length);
}

function clip(ranges: readonly Range[], r: Range): Range[] {
  const out: Range[] = [];
  for (const x of ranges) {
    const s = Math.max(x.offset, r.offset);
    const t = Math.min(x.offset + x.length, r.offset + r.length);
    if (t > s) out.push({ offset: s, length: t - s });
  }
  return out;
}

function merge(ranges: readonly Range[]): Range[] {
  const out: Range[] = [];
  for (const r of [...ranges].sort((a, b) => a.offset - b.offset)) {
    const prev = out[out.length - 1];
    if (prev && prev.offset + prev.length >= r.offset) prev.length = Math.max(prev.offset + prev.length, r.offset + r.length) - prev.offset;
    else out.push({ ...r });
  }
  return out;
}
