import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { Corrupt, Unsupported } from '../../../core/index.js';
import { decodeHeader, encodeHeader, type Header } from '../format/header.js';
import {
  decodeL1, decodeL2, encodeL1, encodeL2Compressed, encodeL2Normal, encodeL2Zero, readEntry, writeEntry,
} from '../format/entries.js';
import { entriesPerBlock, fillRefcounts, getRefcount, refcountsAllZero, setRefcount } from '../format/refcount-block.js';
import { decodeSnapshotTable, encodeSnapshotTable, makeExtra, type SnapshotEntry } from '../format/snapshot-table.js';
import { EXT_BACKING_FORMAT, EXT_BITMAPS } from '../format/constants.js';
import { createImage } from '../index.js';
import { hasQemu, ok, tempDir, warnIfNoQemu } from './helpers.js';

function expectSameBytes(a: Buffer, b: Buffer): void {
  expect(a.length).toBe(b.length);
  let i = 0;
  while (i < a.length && a[i] === b[i]) i++;
  expect(i === a.length ? 'identical' : `first difference at byte ${i}`).toBe('identical');
}

function baseHeader(): Header {
  return {
    version: 3, backingFileOffset: 0, backingFileSize: 0, clusterBits: 16, size: 1 << 30, cryptMethod: 0,
    l1Size: 2, l1TableOffset: 0x30000, refcountTableOffset: 0x10000, refcountTableClusters: 1, nbSnapshots: 0,
    snapshotsOffset: 0, incompatibleFeatures: 0n, compatibleFeatures: 1n, autoclearFeatures: 0n, refcountOrder: 4,
    headerLength: 112, compressionType: 0, unknownFields: new Uint8Array(0), extensions: [],
  };
}

describe('qcow2 header codec', () => {
  it('round-trips a v3 header with backing name, unknown header fields and unknown extensions', () => {
    const h = baseHeader();
    h.unknownFields = Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8]);
    h.backingFile = 'base image.qcow2';
    h.extensions = [
      { type: EXT_BACKING_FORMAT, data: new TextEncoder().encode('qcow2') },
      { type: 0x12345678, data: Uint8Array.from([9, 9, 9]) },
      { type: EXT_BITMAPS, data: new Uint8Array(24).fill(7) },
    ];
    const buf = encodeHeader(h);
    const d = decodeHeader(buf);
    expect(d.headerLength).toBe(120);
    expect([...d.unknownFields]).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    expect(d.backingFile).toBe('base image.qcow2');
    const types = d.extensions.map((e) => e.type);
    // QEMU's order: backing format, feature table, bitmaps, unknown.
    expect(types).toEqual([EXT_BACKING_FORMAT, 0x6803f857, EXT_BITMAPS, 0x12345678]);
    expect([...d.extensions[3]!.data]).toEqual([9, 9, 9]);
    expect([...d.extensions[2]!.data]).toEqual(new Array(24).fill(7));
    expect(encodeHeader(d)).toEqual(buf);
  });

  it('round-trips a v2 header (72 bytes, no feature table)', () => {
    const h = { ...baseHeader(), version: 2 as const, compatibleFeatures: 0n };
    const d = decodeHeader(encodeHeader(h));
    expect(d.version).toBe(2);
    expect(d.headerLength).toBe(72);
    expect(d.refcountOrder).toBe(4);
    expect(d.extensions).toEqual([]);
  });

  it('rejects damage with typed errors', () => {
    const good = encodeHeader(baseHeader());
    expect(() => decodeHeader(good.subarray(0, 50))).toThrow(Corrupt);
    const badMagic = good.slice(); badMagic[0] = 0;
    expect(() => decodeHeader(badMagic)).toThrow(Corrupt);
    const v4 = good.slice(); new DataView(v4.buffer).setUint32(4, 4);
    expect(() => decodeHeader(v4)).toThrow(Unsupported);
    const bits = good.slice(); new DataView(bits.buffer).setUint32(20, 30);
    expect(() => decodeHeader(bits)).toThrow(Corrupt);
  });

  describe.skipIf(!hasQemu)('matches qemu-img create byte for byte', () => {
    warnIfNoQemu('header byte-identity');
    const t = tempDir();
    afterAll(t.cleanup);
    const cases: [string, string[], Parameters<typeof createImage>[1]][] = [
      ['default 64M', ['64M'], { size: 64 << 20 }],
      ['1T', ['1T'], { size: 2 ** 40 }],
      ['v2', ['-o', 'compat=0.10', '1G'], { size: 1 << 30, compat: '0.10' }],
      ['4k clusters', ['-o', 'cluster_size=4096', '100M'], { size: 100 << 20, clusterSize: 4096 }],
      ['512 clusters', ['-o', 'cluster_size=512', '1M'], { size: 1 << 20, clusterSize: 512 }],
      ['2M clusters', ['-o', 'cluster_size=2M', '10G'], { size: 10 * 2 ** 30, clusterSize: 2 << 20 }],
      ['lazy refcounts', ['-o', 'lazy_refcounts=on', '8M'], { size: 8 << 20, lazyRefcounts: true }],
      ['refcount_bits=1', ['-o', 'refcount_bits=1', '8M'], { size: 8 << 20, refcountBits: 1 }],
      ['refcount_bits=64', ['-o', 'refcount_bits=64', '8M'], { size: 8 << 20, refcountBits: 64 }],
      ['size rounded up to 512', ['1000'], { size: 1000 }],
    ];
    for (const [name, args, opts] of cases) {
      it(name, async () => {
        const theirs = join(t.dir, `${name}-q.qcow2`.replace(/ /g, '_'));
        const ours = join(t.dir, `${name}-o.qcow2`.replace(/ /g, '_'));
        ok('qemu-img', ['create', '-f', 'qcow2', ...args.slice(0, -1), theirs, args[args.length - 1]!]);
        await createImage(ours, opts);
        expectSameBytes(readFileSync(ours), readFileSync(theirs));
      });
    }
    it('with a backing file and format', async () => {
      const base = join(t.dir, 'base.qcow2');
      ok('qemu-img', ['create', '-f', 'qcow2', base, '16M']);
      const theirs = join(t.dir, 'ov-q.qcow2');
      const ours = join(t.dir, 'ov-o.qcow2');
      ok('qemu-img', ['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', theirs]);
      await createImage(ours, { backingFile: 'base.qcow2', backingFormat: 'qcow2' });
      expectSameBytes(readFileSync(ours), readFileSync(theirs));
    });
  });
});

describe('L1/L2 entry codec', () => {
  it('decodes the entries QEMU writes', () => {
    const t = new Uint8Array(8);
    new DataView(t.buffer).setBigUint64(0, 0x8000000000050000n);
    expect(decodeL2(...readEntry(t, 0), 16)).toMatchObject({ kind: 'normal', offset: 0x50000, copied: true });
    new DataView(t.buffer).setBigUint64(0, 1n);
    expect(decodeL2(...readEntry(t, 0), 16)).toMatchObject({ kind: 'zero', offset: 0 });
    new DataView(t.buffer).setBigUint64(0, 0x4000000000050056n);
    const c = decodeL2(...readEntry(t, 0), 16);
    expect(c).toMatchObject({ kind: 'compressed', compressedOffset: 0x50056 });
    expect(c.compressedBytes).toBe(512 - 0x56);
  });

  it('round-trips standard, zero and compressed entries at every cluster size', () => {
    fc.assert(fc.property(fc.integer({ min: 9, max: 21 }), fc.integer({ min: 0, max: 2 ** 47 - 1 }), fc.boolean(), fc.integer({ min: 1, max: 4096 }),
      (bits, rawOff, copied, bytes) => {
        const cs = 2 ** bits;
        const off = Math.floor(rawOff / cs) * cs;
        const t = new Uint8Array(8);
        writeEntry(t, 0, ...encodeL2Normal(off, copied));
        const n = decodeL2(...readEntry(t, 0), bits);
        expect(n.offset).toBe(off);
        expect(n.copied).toBe(copied);
        expect(n.kind).toBe(off === 0 ? 'unallocated' : 'normal');
        writeEntry(t, 0, ...encodeL2Zero(off, false));
        expect(decodeL2(...readEntry(t, 0), bits)).toMatchObject({ kind: 'zero', offset: off });
        writeEntry(t, 0, ...encodeL1(off, copied));
        expect(decodeL1(...readEntry(t, 0))).toMatchObject({ l2Offset: off, copied });
        const x = 62 - (bits - 8);
        const coff = rawOff % 2 ** Math.min(x, 47);
        const clen = Math.min(bytes, cs);
        writeEntry(t, 0, ...encodeL2Compressed(coff, clen, bits));
        const c = decodeL2(...readEntry(t, 0), bits);
        expect(c.kind).toBe('compressed');
        expect(c.compressedOffset).toBe(coff);
        expect(c.compressedBytes!).toBeGreaterThanOrEqual(clen);
        expect(c.compressedBytes!).toBeLessThan(clen + 512);
      }));
  });
});

describe('refcount block codec', () => {
  it('stores every width 1–64 without disturbing neighbours', () => {
    fc.assert(fc.property(fc.integer({ min: 0, max: 6 }), fc.array(fc.tuple(fc.nat(), fc.nat()), { maxLength: 50 }), (order, writes) => {
      const cs = 512;
      const n = entriesPerBlock(cs, order);
      const max = order === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
      const block = new Uint8Array(cs);
      const model = new Map<number, number>();
      for (const [i, v] of writes) {
        const idx = i % n;
        const val = v % (Math.min(max, 2 ** 40) + 1);
        setRefcount(block, idx, order, val);
        model.set(idx, val);
      }
      for (let i = 0; i < n; i++) expect(getRefcount(block, i, order)).toBe(model.get(i) ?? 0);
    }));
  });

  it('fills and checks ranges of every width as entry by entry would', () => {
    fc.assert(fc.property(fc.integer({ min: 0, max: 6 }), fc.nat(), fc.nat(), fc.nat(), fc.array(fc.nat(), { maxLength: 8 }), (order, x, y, v, noise) => {
      const cs = 512;
      const n = entriesPerBlock(cs, order);
      const max = order === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
      const [from, to] = [Math.min(x % (n + 1), y % (n + 1)), Math.max(x % (n + 1), y % (n + 1))];
      const value = 1 + (v % Math.min(max, 1000));
      const block = new Uint8Array(cs);
      for (const i of noise) setRefcount(block, i % n, order, 1); // entries around the range
      const expected = Uint8Array.from(block);
      for (let i = from; i < to; i++) setRefcount(expected, i, order, value);
      const zeroBefore = Array.from({ length: to - from }, (_, k) => getRefcount(block, from + k, order)).every((e) => e === 0);
      expect(refcountsAllZero(block, from, to, order)).toBe(zeroBefore);
      fillRefcounts(block, from, to, order, value);
      expect(Buffer.compare(Buffer.from(block), Buffer.from(expected))).toBe(0);
      expect(refcountsAllZero(block, from, to, order)).toBe(from === to);
    }), { numRuns: 500 });
  });

  it('packs sub-byte widths LSB first', () => {
    const b = new Uint8Array(2);
    setRefcount(b, 0, 0, 1);
    setRefcount(b, 3, 0, 1);
    expect(b[0]).toBe(0b1001);
    const c = new Uint8Array(2);
    setRefcount(c, 1, 2, 0xa);
    expect(c[0]).toBe(0xa0);
  });
});

describe('snapshot table codec', () => {
  it('round-trips entries with extra data, ids and names', () => {
    const entries: SnapshotEntry[] = [
      { l1TableOffset: 0x50000, l1Size: 16, id: '1', name: 'first', dateSec: 1700000000, dateNsec: 123000, vmClockNsec: 5, vmStateSize: 0, extra: makeExtra(0, 1 << 30) },
      { l1TableOffset: 0x90000, l1Size: 16, id: '2', name: 'ünïcode name', dateSec: 1, dateNsec: 0, vmClockNsec: 0, vmStateSize: 7, extra: new Uint8Array(0) },
    ];
    const buf = encodeSnapshotTable(entries);
    expect(buf.length % 8).toBe(0);
    expect(decodeSnapshotTable(buf, 2)).toEqual(entries);
    expect(() => decodeSnapshotTable(buf.subarray(0, 60), 2)).toThrow(Corrupt);
  });
});
