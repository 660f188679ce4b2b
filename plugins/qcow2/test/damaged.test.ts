/**
 * Damaged and hostile images: every one gives a typed error (Corrupt, Unsupported, …) quickly,
 * never a crash, a hang or an allocation sized by a field of the file.
 */
import { copyFileSync, readFileSync, symlinkSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Corrupt, OffloadError, Unsupported } from '../../../core/index.js';
import { createImage, openImage, type Image } from '../index.js';
import { tempDir } from './helpers.js';

const t = tempDir('qcow2-damaged-');
afterAll(t.cleanup);
let good: string;
let goodBytes: Buffer;

/** A valid image with data in two L2 tables, a zero cluster and a snapshot; 4 KiB clusters. */
beforeAll(async () => {
  good = join(t.dir, 'good.qcow2');
  await createImage(good, { size: 8 << 20, clusterSize: 4096 });
  const img = await openImage(good, { readOnly: false });
  await img.write(0, new Uint8Array(20000).fill(1));
  await img.snapshots.create('s');
  await img.write(4096, new Uint8Array(4096).fill(2));
  await img.write(3 << 20, new Uint8Array(8192).fill(3));
  await img.writeZeroes(8192, 4096);
  await img.close();
  goodBytes = readFileSync(good);
});

function variant(name: string, mutate: (b: Buffer) => unknown): string {
  const b = Buffer.from(goodBytes);
  const r = mutate(b);
  const out = Buffer.isBuffer(r) ? r : b;
  const file = join(t.dir, `${name}.qcow2`);
  writeFileSync(file, out);
  return file;
}

const be32 = (b: Buffer, off: number, v: number) => b.writeUInt32BE(v >>> 0, off);
const be64 = (b: Buffer, off: number, v: bigint) => b.writeBigUInt64BE(v, off);
const u64 = (b: Buffer, off: number) => Number(b.readBigUInt64BE(off));

/** Open, then read and map everything: the ways a caller touches an image. */
async function exercise(file: string, opts: Parameters<typeof openImage>[1] = {}): Promise<void> {
  const img = await openImage(file, opts);
  try {
    await touch(img);
  } finally {
    await img.close();
  }
}

async function touch(img: Image): Promise<void> {
  await img.map();
  for (let p = 0; p < img.virtualSize && p < (16 << 20); p += 1 << 20) await img.read(p, Math.min(1 << 20, img.virtualSize - p));
  await img.snapshots.list();
}

async function expectTyped(p: Promise<unknown>, type: typeof Corrupt | typeof Unsupported, re?: RegExp): Promise<void> {
  const e = await p.then(() => undefined, (x: unknown) => x);
  expect(e, 'expected a typed error').toBeInstanceOf(type);
  if (re) expect((e as Error).message).toMatch(re);
}

describe('damaged image corpus', () => {
  const l1Offset = () => u64(goodBytes, 40);
  const l2Offset = () => u64(goodBytes, l1Offset()) & 0x00ff_ffff_ffff_fe00;

  const cases: [string, (b: Buffer) => unknown, typeof Corrupt | typeof Unsupported, RegExp?][] = [
    ['truncated header', (b) => b.subarray(0, 50), Corrupt, /too short/],
    ['truncated v3 header', (b) => b.subarray(0, 90), Corrupt],
    ['version 4', (b) => be32(b, 4, 4), Unsupported, /version 4/],
    ['version 1', (b) => be32(b, 4, 1), Unsupported],
    ['unknown incompatible feature bit', (b) => be64(b, 72, 1n << 10n), Unsupported, /incompatible/],
    ['encryption (AES)', (b) => be32(b, 32, 1), Unsupported, /encrypt/],
    ['encryption (LUKS)', (b) => be32(b, 32, 2), Unsupported, /encrypt/],
    ['external data file', (b) => be64(b, 72, 1n << 2n), Unsupported, /external data file/],
    ['extended L2 entries', (b) => be64(b, 72, 1n << 4n), Unsupported],
    ['unknown compression type 2', (b) => { be64(b, 72, 1n << 3n); b[104] = 2; }, Unsupported, /unknown compression type 2/],
    ['zstd compression type without its feature bit', (b) => { b[104] = 1; }, Corrupt, /feature bit must be set/],
    ['compression feature bit with zlib', (b) => { be64(b, 72, 1n << 3n); b[104] = 0; }, Corrupt, /feature bit must not be set/],
    ['cluster_bits 30', (b) => be32(b, 20, 30), Corrupt],
    ['refcount_order 7', (b) => be32(b, 96, 7), Corrupt],
    ['header_length odd', (b) => be32(b, 100, 105), Corrupt],
    ['l1_size past EOF', (b) => be32(b, 36, 1_000_000), Corrupt, /L1/],
    ['l1_size 0xffffffff', (b) => be32(b, 36, 0xffffffff), Corrupt, /L1/],
    ['L1 too small for the size', (b) => be64(b, 24, 1n << 40n), Corrupt, /L1/],
    ['unaligned L1 offset', (b) => be64(b, 40, BigInt(l1Offset() + 8)), Corrupt, /aligned/],
    ['L1 offset in the header', (b) => be64(b, 40, 0n), Corrupt, /header/],
    ['unaligned L2 offset', (b) => be64(b, l1Offset(), BigInt(l2Offset() + 512) | (1n << 63n)), Corrupt, /aligned/],
    ['L2 table past EOF', (b) => be64(b, l1Offset(), BigInt(b.length + (1 << 20)) | (1n << 63n)), Corrupt, /past the end/],
    ['L2 entry (data cluster) past EOF', (b) => be64(b, l2Offset(), BigInt(b.length + (64 << 20)) | (1n << 63n)), Corrupt, /past the end/],
    ['refcount table overlapping the header', (b) => be64(b, 48, 0n), Corrupt, /header/],
    ['refcount table unaligned', (b) => be64(b, 48, 4096n + 8n), Corrupt],
    ['refcount table past EOF', (b) => be32(b, 56, 100_000), Corrupt],
    ['huge snapshot count', (b) => be32(b, 60, 0x7fffffff), Corrupt, /snapshots/],
    ['snapshot count beyond the table', (b) => be32(b, 60, 1000), Corrupt, /snapshot/],
    ['snapshot table past EOF', (b) => be64(b, 64, BigInt(b.length + 4096 * 10)), Corrupt],
    ['backing name longer than 1023', (b) => { be64(b, 8, 512n); be32(b, 16, 2000); }, Corrupt, /too long/],
    ['backing name outside the header cluster', (b) => { be64(b, 8, 4000n); be32(b, 16, 500); }, Corrupt],
    ['compressed cluster of garbage', (b) => be64(b, l2Offset() + 16, (1n << 62n) | BigInt(l2Offset())), Corrupt, /compressed/],
  ];

  for (const [name, mutate, type, re] of cases) {
    it(`${name} → ${type.name}`, async () => {
      const file = variant(name.replace(/[^a-z0-9]+/gi, '_'), mutate);
      await expectTyped(exercise(file, { format: 'qcow2' }), type, re);
    });
  }

  it('bad magic with format qcow2 → Corrupt; probed, it is a raw image', async () => {
    const file = variant('bad_magic', (b) => { b[0] = 0x00; });
    await expectTyped(exercise(file, { format: 'qcow2' }), Corrupt, /magic/);
    const img = await openImage(file);
    expect(img.format).toBe('raw');
    await img.close();
  });

  it('a backing chain that loops → Corrupt', async () => {
    const a = join(t.dir, 'loop-a.qcow2');
    const b = join(t.dir, 'loop-b.qcow2');
    await createImage(a, { size: 1 << 20 });
    await createImage(b, { size: 1 << 20, backingFile: 'loop-a.qcow2', backingFormat: 'qcow2' });
    // Point a at b after the fact (as a careless rebase -u would).
    copyFileSync(b, join(t.dir, 'tmp.qcow2'));
    await createImage(a, { size: 1 << 20, backingFile: 'loop-b.qcow2', backingFormat: 'qcow2', overwrite: true }).catch(() => {});
    const self = join(t.dir, 'self.qcow2');
    await createImage(self, { size: 1 << 20, backingFile: 'loop-b.qcow2', backingFormat: 'qcow2' });
    await expectTyped(openImage(b), Corrupt, /loop/);
    // An image naming itself as backing.
    const selfBytes = readFileSync(self);
    const name = Buffer.from('self.qcow2');
    const off = Number(selfBytes.readBigUInt64BE(8));
    name.copy(selfBytes, off);
    selfBytes.writeUInt32BE(name.length, 16);
    writeFileSync(self, selfBytes);
    await expectTyped(openImage(self), Corrupt, /loop/);
  });

  it('a backing file outside the allowed root → refused', async () => {
    const pool = join(t.dir, 'pool');
    mkdirSync(pool);
    const outside = join(t.dir, 'outside.qcow2');
    await createImage(outside, { size: 1 << 20 });
    await createImage(join(pool, 'escape.qcow2'), { backingFile: '../outside.qcow2', backingFormat: 'qcow2' });
    symlinkSync(outside, join(pool, 'link.qcow2'));
    await createImage(join(pool, 'via-link.qcow2'), { backingFile: 'link.qcow2', backingFormat: 'qcow2' });
    for (const f of ['escape.qcow2', 'via-link.qcow2']) {
      const e = await openImage(join(pool, f), { allowedRoot: pool }).then(() => undefined, (x: unknown) => x);
      expect(e).toBeInstanceOf(Unsupported);
      expect((e as Error).message).toMatch(/outside the allowed root/);
      // Without a root the same chain opens.
      await (await openImage(join(pool, f))).close();
    }
  });

  it('property: mutated header and table bytes never crash, hang or escape as untyped errors', async () => {
    const l1 = l1Offset();
    const l2 = l2Offset();
    const reftable = u64(goodBytes, 48);
    const snaps = u64(goodBytes, 64);
    const regions: [number, number][] = [[0, 112], [l1, 64], [l2, 256], [reftable, 64], [snaps, 96]];
    let n = 0;
    await fc.assert(fc.asyncProperty(
      fc.array(fc.tuple(fc.integer({ min: 0, max: regions.length - 1 }), fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 6 }),
      fc.boolean(),
      async (muts, rw) => {
        const b = Buffer.from(goodBytes);
        for (const [r, pos, val] of muts) {
          const [start, len] = regions[r]!;
          b[start + (pos % len)] = val;
        }
        const file = join(t.dir, `prop-${n++ % 4}.qcow2`);
        writeFileSync(file, b);
        try {
          const img = await openImage(file, { format: 'qcow2', readOnly: !rw });
          try {
            await touch(img);
            if (rw) {
              await img.write(4096 * 3 + 100, new Uint8Array(5000).fill(9));
              await img.writeZeroes(0, 4096);
              await img.check();
            }
          } finally {
            await img.close();
          }
        } catch (e) {
          if (!(e instanceof OffloadError)) throw e;
        }
      }), { numRuns: 150 });
  });
});
