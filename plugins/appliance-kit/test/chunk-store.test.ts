/** The mocks' thin chunk store: sharing by reference, copy-on-write, and reference counts that free data. */
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterEach, describe, expect, it } from 'vitest';
import { ChunkStore, coarsenSpans, diffMaps, ZERO_CHUNK, type BlockMap } from '../index.js';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** A store of 16-byte chunks (in `dir`, or in memory) holding one volume with `data` written at 0. */
function storeWith(data: Buffer, dir?: string): { store: ChunkStore; vol: BlockMap } {
  const store = new ChunkStore(16, dir);
  const vol: BlockMap = new Map();
  store.write(vol, 0, data);
  return { store, vol };
}

/** A fresh folder, removed after the test. */
function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'kit-chunks-'));
  dirs.push(dir);
  return dir;
}

describe('ChunkStore', () => {
  it('a copied map shares every chunk; writes to either side copy only the touched chunk', () => {
    const { store, vol } = storeWith(Buffer.alloc(64, 1));
    const snap = store.copyMap(vol);
    expect(store.storedBytes).toBe(64);
    store.write(vol, 20, Buffer.from('xy'));
    expect(store.storedBytes).toBe(80);
    expect(store.read(snap, 20, 2)).toEqual(Buffer.from([1, 1]));
    expect(store.read(vol, 20, 2)).toEqual(Buffer.from('xy'));
    store.dropMap(snap);
    expect(store.storedBytes).toBe(64);
  });

  it('all-zero chunks are dropped (thin); extents merge adjacent chunks', () => {
    const store = new ChunkStore(16);
    const vol: BlockMap = new Map();
    store.write(vol, 16, Buffer.alloc(32, 9));
    store.write(vol, 80, Buffer.alloc(4, 9));
    expect(store.extents(vol, 0, 128)).toEqual([
      { offset: 16, length: 32, kind: 'data' },
      { offset: 80, length: 16, kind: 'data' },
    ]);
    store.write(vol, 80, Buffer.alloc(4));
    expect(store.extents(vol, 0, 128)).toEqual([{ offset: 16, length: 32, kind: 'data' }]);
  });

  it('reads what random writes imply, across snapshots (model check)', () => {
    fc.assert(
      fc.property(
        fc.array(fc.record({ off: fc.nat(200), data: fc.uint8Array({ minLength: 1, maxLength: 40 }), snap: fc.boolean() }), { maxLength: 30 }),
        (ops) => {
          const store = new ChunkStore(16);
          const vol: BlockMap = new Map();
          const model = new Uint8Array(256);
          const snaps: { map: BlockMap; model: Uint8Array }[] = [];
          for (const op of ops) {
            store.write(vol, op.off, op.data);
            model.set(op.data, op.off);
            if (op.snap) snaps.push({ map: store.copyMap(vol), model: model.slice() });
          }
          expect(store.read(vol, 0, 256)).toEqual(Buffer.from(model));
          for (const s of snaps) expect(store.read(s.map, 0, 256)).toEqual(Buffer.from(s.model));
        },
      ),
      { numRuns: 100 },
    );
  });

  it('persists new chunks before and deletes freed ones after the state write; load rebuilds counts', () => {
    const dir = tempDir();
    const { store, vol } = storeWith(Buffer.alloc(32, 3), dir);
    store.writeNewChunks();
    expect(readdirSync(dir).sort()).toEqual(['1', '2']);
    store.write(vol, 0, Buffer.alloc(16, 4));
    store.writeNewChunks();
    expect(readdirSync(dir).sort()).toEqual(['1', '2', '3']); // chunk 1 released but kept until the state is written
    store.deleteReleasedChunks();
    expect(readdirSync(dir).sort()).toEqual(['2', '3']);

    const again = new ChunkStore(16, dir);
    again.load([vol], store.nextChunkId);
    expect(again.read(vol, 0, 32)).toEqual(Buffer.concat([Buffer.alloc(16, 4), Buffer.alloc(16, 3)]));
  });
});

describe('ChunkStore: zeroes and saved state', () => {
  it('zero marks whole chunks allocated-zero and rewrites partial ones; reads, extents and bytes follow', () => {
    const { store, vol } = storeWith(Buffer.alloc(48, 5));
    const snap = store.copyMap(vol);
    store.zero(vol, 8, 40); // half of chunk 0, all of chunks 1 and 2
    store.zero(vol, 64, 16); // an unallocated chunk becomes allocated-zero too
    expect(vol.get(1)).toBe(ZERO_CHUNK);
    expect(store.read(vol, 0, 80)).toEqual(Buffer.concat([Buffer.alloc(8, 5), Buffer.alloc(72)]));
    expect(store.read(snap, 0, 48)).toEqual(Buffer.alloc(48, 5));
    expect(store.extents(vol, 0, 80)).toEqual([
      { offset: 0, length: 16, kind: 'data' },
      { offset: 16, length: 32, kind: 'zero' },
      { offset: 64, length: 16, kind: 'zero' },
    ]);
    expect(store.allocatedBytes(vol)).toBe(16);
    expect(store.uniqueBytes(vol)).toBe(16);
    expect(store.uniqueBytes(snap)).toBe(48); // every chunk it had is now its alone
    store.write(vol, 16, Buffer.alloc(4, 1)); // writing into a zero chunk makes data again
    expect(store.read(vol, 16, 6)).toEqual(Buffer.from([1, 1, 1, 1, 0, 0]));
  });

  it('load sweeps only its own leftovers (unreferenced chunks, interrupted writes) and refuses a missing chunk', () => {
    const dir = tempDir();
    const { store, vol } = storeWith(Buffer.alloc(32, 7), dir);
    store.writeNewChunks();
    writeFileSync(join(dir, '9'), 'left by a crash before the state write');
    writeFileSync(join(dir, '3.tmp'), 'torn');
    writeFileSync(join(dir, 'notes.txt'), 'not the store\'s');
    const again = new ChunkStore(16, dir);
    again.load([vol], 2);
    expect(readdirSync(dir).sort()).toEqual(['1', '2', 'notes.txt']);
    expect(again.nextChunkId).toBe(3); // past every referenced chunk, whatever the state said
    expect(again.read(vol, 0, 32)).toEqual(Buffer.alloc(32, 7));
    rmSync(join(dir, '2'));
    expect(() => new ChunkStore(16, dir).load([vol], 3)).toThrow(expect.objectContaining({ code: 'Corrupt', message: expect.stringMatching(/chunk 2/) }));
  });
});

describe('ChunkStore: diff of two maps (changed-block tracking)', () => {
  it('reports chunks whose ids differ, merged and clipped; absent and ZERO_CHUNK read the same', () => {
    const store = new ChunkStore(16);
    const vol: BlockMap = new Map();
    store.write(vol, 0, Buffer.alloc(64, 1)); // chunks 0-3
    store.zero(vol, 96, 16); // chunk 6: allocated zero
    const s1 = store.copyMap(vol);
    expect(store.diff(s1, vol, 0, 256)).toEqual([]);
    store.write(vol, 20, Buffer.from('ab')); // partial chunk 1
    store.write(vol, 32, Buffer.alloc(16, 2)); // chunk 2, whole
    store.write(vol, 48, Buffer.alloc(16)); // zeros over data: chunk 3 dropped
    store.write(vol, 160, Buffer.from('z')); // a hole: chunk 10
    vol.delete(6); // ZERO_CHUNK → absent: reads the same
    store.zero(vol, 128, 16); // absent → ZERO_CHUNK (chunk 8): reads the same
    expect(store.diff(s1, vol, 0, 256)).toEqual([{ offset: 16, length: 48 }, { offset: 160, length: 16 }]);
    expect(store.diff(vol, s1, 0, 256)).toEqual(store.diff(s1, vol, 0, 256)); // symmetric
    // Clipped to the range, also inside a chunk.
    expect(store.diff(s1, vol, 21, 30)).toEqual([{ offset: 21, length: 30 }]);
    expect(store.diff(s1, vol, 60, 110)).toEqual([{ offset: 60, length: 4 }, { offset: 160, length: 10 }]);
    expect(store.diff(s1, vol, 64, 96)).toEqual([]);
    expect(store.diff(s1, vol, 0, 0)).toEqual([]);
    // The same bytes under another id still count (over-report, never under-report).
    const again = store.copyMap(vol);
    store.write(again, 160, Buffer.from('z'));
    expect(store.read(again, 160, 16)).toEqual(store.read(vol, 160, 16));
    expect(store.diff(vol, again, 0, 256)).toEqual([{ offset: 160, length: 16 }]);
  });

  it('walks either the maps or the range, with the same answer', () => {
    const a: BlockMap = new Map([[1, 5], [1_000_000, 6]]);
    const b: BlockMap = new Map([[1, 5], [1_000_000, 7], [3, 8]]);
    expect(diffMaps(a, b, 16, 0, 64)).toEqual([{ offset: 48, length: 16 }]); // few indices: walks the range
    expect(diffMaps(a, b, 16, 0, 16 * 2_000_000)).toEqual([{ offset: 48, length: 16 }, { offset: 16_000_000, length: 16 }]);
  });

  it('coarsenSpans widens to a unit, merges what touches, clips to the range', () => {
    const spans = [{ offset: 16, length: 16 }, { offset: 48, length: 16 }, { offset: 200, length: 8 }];
    expect(coarsenSpans(spans, 64, 0, 256)).toEqual([{ offset: 0, length: 64 }, { offset: 192, length: 64 }]);
    expect(coarsenSpans(spans, 64, 10, 200)).toEqual([{ offset: 10, length: 54 }, { offset: 192, length: 18 }]);
    expect(coarsenSpans(spans, 16, 0, 256)).toEqual([spans[0], spans[1], { offset: 192, length: 16 }]);
    expect(coarsenSpans([{ offset: 0, length: 16 }, { offset: 16, length: 16 }], 16, 0, 64)).toEqual([{ offset: 0, length: 32 }]);
  });

  it('outside the diff, the two maps read the same (model check)', () => {
    fc.assert(
      fc.property(
        fc.array(fc.record({ off: fc.nat(240), data: fc.uint8Array({ minLength: 1, maxLength: 40 }), zero: fc.boolean(), snap: fc.boolean() }), { maxLength: 30 }),
        fc.nat(255),
        fc.nat(256),
        (ops, from, len) => {
          const store = new ChunkStore(16);
          const vol: BlockMap = new Map();
          const snaps: BlockMap[] = [new Map()];
          for (const op of ops) {
            const n = Math.min(op.data.length, 256 - op.off);
            if (op.zero) store.zero(vol, op.off, n);
            else store.write(vol, op.off, op.data.subarray(0, n));
            if (op.snap) snaps.push(store.copyMap(vol));
          }
          const length = Math.min(len, 256 - from);
          for (const s of snaps) {
            const spans = store.diff(s, vol, from, length);
            const before = store.read(s, 0, 256);
            const now = store.read(vol, 0, 256);
            let pos = from;
            for (const sp of [...spans, { offset: from + length, length: 0 }]) {
              expect(sp.offset).toBeGreaterThanOrEqual(pos);
              expect(now.subarray(pos, sp.offset)).toEqual(before.subarray(pos, sp.offset));
              pos = sp.offset + sp.length;
            }
            expect(pos).toBeLessThanOrEqual(from + length);
          }
        },
      ),
      { numRuns: 100 },
    );
  });
});
