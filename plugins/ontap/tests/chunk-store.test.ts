/** The mock's thin chunk store: sharing by reference, copy-on-write, and reference counts that free data. */
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterEach, describe, expect, it } from 'vitest';
import { ChunkStore, type BlockMap } from '../appliance/chunk-store.js';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

describe('ChunkStore', () => {
  it('a copied map shares every chunk; writes to either side copy only the touched chunk', () => {
    const store = new ChunkStore(16);
    const vol: BlockMap = new Map();
    store.write(vol, 0, Buffer.alloc(64, 1));
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
    const dir = mkdtempSync(join(tmpdir(), 'ontap-chunks-'));
    dirs.push(dir);
    const store = new ChunkStore(16, dir);
    const vol: BlockMap = new Map();
    store.write(vol, 0, Buffer.alloc(32, 3));
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
