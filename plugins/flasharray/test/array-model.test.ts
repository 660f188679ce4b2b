/**
 * The mock's thin store against a plain model: random writes, zeroes, snapshots, copies,
 * overwrites, resizes and eradications must read back exactly like full byte arrays would, and
 * every chunk must be freed once nothing refers to it (checked on disk).
 */
import fc from 'fast-check';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ArrayModel, CHUNK_SIZE } from '../appliance/array-model.js';

const SIZE = 6 * CHUNK_SIZE;

type Op =
  | { t: 'write'; v: number; off: number; len: number; byte: number }
  | { t: 'zero'; v: number; off: number; len: number }
  | { t: 'snap'; v: number }
  | { t: 'copy'; from: number; fromSnap: boolean }
  | { t: 'overwrite'; v: number; from: number }
  | { t: 'grow'; v: number }
  | { t: 'shrink'; v: number; to: number }
  | { t: 'drop'; v: number };

const range = fc.tuple(fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: 2 * CHUNK_SIZE + 100 }));
const op: fc.Arbitrary<Op> = fc.oneof(
  fc.record({ t: fc.constant('write' as const), v: fc.nat(3), r: range, byte: fc.integer({ min: 1, max: 255 }) }).map(({ r, ...o }) => ({ ...o, off: r[0], len: r[1] })),
  fc.record({ t: fc.constant('zero' as const), v: fc.nat(3), r: range }).map(({ r, ...o }) => ({ ...o, off: r[0], len: r[1] })),
  fc.record({ t: fc.constant('snap' as const), v: fc.nat(3) }),
  fc.record({ t: fc.constant('copy' as const), from: fc.nat(3), fromSnap: fc.boolean() }),
  fc.record({ t: fc.constant('overwrite' as const), v: fc.nat(3), from: fc.nat(3) }),
  fc.record({ t: fc.constant('grow' as const), v: fc.nat(3) }),
  fc.record({ t: fc.constant('shrink' as const), v: fc.nat(3), to: fc.integer({ min: 1, max: SIZE / 512 }) }),
  fc.record({ t: fc.constant('drop' as const), v: fc.nat(3) }),
);

describe('thin chunk store', () => {
  it('matches a plain byte-array model and frees every chunk at the end', async () => {
    await fc.assert(fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 25 }), async (ops) => {
      const dir = await mkdtemp(join(tmpdir(), 'fa-model-'));
      try {
        const m = await ArrayModel.open({ stateDir: dir });
        const ref = new Map<string, Buffer>(); // name → bytes (volumes and snapshots)
        let n = 0;
        const vols = () => [...ref.keys()].filter((k) => !k.includes('.')).sort();
        const pick = (i: number, pool = vols()) => pool[i % Math.max(pool.length, 1)];
        await m.createVolume('v0', SIZE);
        ref.set('v0', Buffer.alloc(SIZE));
        for (const o of ops) {
          const v = pick('v' in o ? o.v : 0);
          if (!v) continue;
          const cur = ref.get(v)!;
          if (o.t === 'write' || o.t === 'zero') {
            const off = Math.min(o.off, cur.length - 1);
            const len = Math.min(o.len, cur.length - off);
            if (o.t === 'write') await m.write(v, off, Buffer.alloc(len, o.byte));
            else await m.writeZeroes(v, off, len);
            cur.fill(o.t === 'write' ? o.byte : 0, off, off + len);
          } else if (o.t === 'snap') {
            const s = `${v}.s${n++}`;
            await m.createSnapshot(v, s.split('.')[1]!);
            ref.set(s, Buffer.from(cur));
          } else if (o.t === 'copy') {
            const snaps = [...ref.keys()].filter((k) => k.includes('.'));
            const src = o.fromSnap && snaps.length ? snaps[o.from % snaps.length]! : pick(o.from)!;
            const name = `c${n++}`;
            await m.copyVolume(name, src, false);
            ref.set(name, Buffer.from(ref.get(src)!));
          } else if (o.t === 'overwrite') {
            const src = pick(o.from)!;
            await m.copyVolume(v, src, true);
            ref.set(v, Buffer.from(ref.get(src)!));
          } else if (o.t === 'grow') {
            await m.resizeVolume(v, cur.length + CHUNK_SIZE / 2, false);
            ref.set(v, Buffer.concat([cur, Buffer.alloc(CHUNK_SIZE / 2)]));
          } else if (o.t === 'shrink') {
            const to = Math.min(o.to * 512, cur.length);
            await m.resizeVolume(v, to, true);
            ref.set(v, Buffer.from(cur.subarray(0, to)));
          } else if (o.t === 'drop' && vols().length > 1) {
            await m.setVolumeDestroyed(v, true);
            await m.eradicateVolume(v);
            for (const k of [...ref.keys()]) if (k === v || k.startsWith(`${v}.`)) ref.delete(k);
          }
        }
        // Reopen from disk: persisted state must read back identically.
        await m.idle();
        const again = await ArrayModel.open({ stateDir: dir });
        for (const [name, bytes] of ref) {
          expect((await again.read(name, 0, bytes.length)).equals(bytes), name).toBe(true);
          const ext = await again.extents(name, 0, bytes.length);
          for (const e of ext.extents) if (e.kind === 'zero') expect(bytes.subarray(e.offset, e.offset + e.length).every((b) => b === 0)).toBe(true);
          // nothing outside the extents is non-zero
          let pos = 0;
          for (const e of ext.extents) {
            expect(bytes.subarray(pos, e.offset).every((b) => b === 0)).toBe(true);
            pos = e.offset + e.length;
          }
          expect(bytes.subarray(pos).every((b) => b === 0)).toBe(true);
        }
        for (const name of [...ref.keys()].filter((k) => k.includes('.'))) {
          await again.setSnapshotDestroyed(name, true);
          await again.eradicateSnapshot(name);
        }
        for (const name of [...ref.keys()].filter((k) => !k.includes('.'))) {
          await again.setVolumeDestroyed(name, true);
          await again.eradicateVolume(name);
        }
        expect(await readdir(join(dir, 'chunks'))).toEqual([]);
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    }), { numRuns: Number(process.env.OFFLOAD_LONG) ? 500 : 80, seed: Number(process.env.FC_SEED ?? 20240601) });
  });
});
