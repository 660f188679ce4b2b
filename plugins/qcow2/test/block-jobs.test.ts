/**
 * The engine's block-job surface (what stream, commit and mirror are built on): allocation above a
 * base, copy-on-read fills, zeroing unallocated clusters, emptying, changing the backing file,
 * write tracking and the pivot — each through the public Image only.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { FailedPrecondition, InvalidArgument, Unsupported } from '../../../core/index.js';
import { createImage, openImage, type Image } from '../index.js';
import { hasQemu, ok, pattern, qemuCheckJson, tempDir } from './helpers.js';

const M = 1 << 20;
const K = 1024;
const t = tempDir('qcow2-block-jobs-');
afterAll(t.cleanup);
let n = 0;

/** base.raw (data 0–1M, then a hole) ← mid.qcow2 (data 1–2M, zero 2–3M) ← top.qcow2 (data 3M+64K), 8 MiB. */
async function rawChain(): Promise<{ dir: string; top: Image }> {
  const dir = join(t.dir, `c${n++}`);
  await import('node:fs').then((fs) => fs.mkdirSync(dir));
  const raw = new Uint8Array(8 * M);
  raw.set(pattern(M, 1), 0);
  writeFileSync(join(dir, 'base.raw'), raw);
  await createImage(join(dir, 'mid.qcow2'), { backingFile: 'base.raw', backingFormat: 'raw' });
  const mid = await openImage(join(dir, 'mid.qcow2'), { readOnly: false });
  await mid.write(M, pattern(M, 2));
  await mid.writeZeroes(2 * M, M);
  await mid.close();
  await createImage(join(dir, 'top.qcow2'), { backingFile: 'mid.qcow2', backingFormat: 'qcow2' });
  const top = await openImage(join(dir, 'top.qcow2'), { readOnly: false });
  await top.write(3 * M, pattern(64 * K, 3));
  return { dir, top };
}

describe('allocatedAbove (bdrv_is_allocated_above)', () => {
  it('answers for the image alone, down to a base, and over the whole chain (a raw layer allocates everything)', async () => {
    const { top } = await rawChain();
    const mid = top.backing!;
    const base = mid.backing!;
    expect(await top.allocatedAbove(0, 8 * M, mid)).toEqual([{ start: 3 * M, length: 64 * K, zero: false }]);
    expect(await top.allocatedAbove(0, 8 * M, base)).toEqual([
      { start: M, length: M, zero: false },
      { start: 2 * M, length: M, zero: true },
      { start: 3 * M, length: 64 * K, zero: false },
    ]);
    const all = await top.allocatedAbove(0, 8 * M);
    expect(all[0]).toEqual({ start: 0, length: 2 * M, zero: false });
    expect(all.reduce((s, a) => s + a.length, 0)).toBe(8 * M);
    expect(await mid.allocatedAbove(0, 8 * M, base)).toEqual([{ start: M, length: M, zero: false }, { start: 2 * M, length: M, zero: true }]);
    const other = await openImage(join(t.dir, 'c0', 'mid.qcow2'));
    await expect(top.allocatedAbove(0, M, other)).rejects.toBeInstanceOf(InvalidArgument);
    await other.close();
    await top.close();
  });
});

describe('copy-on-read fills', () => {
  it('fillUnallocated writes only clusters still unallocated; a guest write wins, also one racing the fill', async () => {
    const { dir, top } = await rawChain();
    await top.write(5 * M + 64 * K, pattern(64 * K, 9)); // cluster 1 of the 5M…5M+256K range is the guest's
    const fill = pattern(256 * K, 4);
    const racing = top.write(5 * M + 128 * K, pattern(4 * K, 8)); // a write racing the fill in cluster 2
    const written = await top.fillUnallocated(5 * M, fill);
    await racing;
    expect(written).toBeGreaterThanOrEqual(128 * K);
    expect(written).toBeLessThanOrEqual(192 * K);
    const got = await top.read(5 * M, 256 * K);
    expect(Buffer.from(got.subarray(0, 64 * K)).equals(Buffer.from(fill.subarray(0, 64 * K)))).toBe(true);
    expect(Buffer.from(got.subarray(64 * K, 128 * K)).equals(Buffer.from(pattern(64 * K, 9)))).toBe(true);
    expect(Buffer.from(got.subarray(128 * K, 132 * K)).equals(Buffer.from(pattern(4 * K, 8)))).toBe(true);
    expect(Buffer.from(got.subarray(192 * K)).equals(Buffer.from(fill.subarray(192 * K)))).toBe(true);
    // Partial clusters at both ends: the rest of each cluster comes from the chain (copy-on-write).
    const chainBefore = Buffer.from(await top.read(0, 128 * K));
    const part = chainBefore.subarray(100, 70 * K);
    expect(await top.fillUnallocated(100, part)).toBe(part.length);
    expect(Buffer.from(await top.read(0, 128 * K)).equals(chainBefore)).toBe(true);
    expect((await top.allocatedAbove(0, 128 * K, top.backing)).map((a) => [a.start, a.length])).toEqual([[0, 128 * K]]);
    await top.close();
    if (hasQemu) expect(qemuCheckJson(join(dir, 'top.qcow2')).status).toBe(0);
  });

  it('a guest write racing a fill of all-unallocated clusters wins, whichever lands first (deferred and not)', async () => {
    for (const deferMetadata of [false, true]) {
      const { dir, top } = await rawChain();
      await top.close();
      const img = await openImage(join(dir, 'top.qcow2'), { readOnly: false, deferMetadata });
      for (let round = 0; round < 8; round++) {
        const at = 6 * M + round * 256 * K; // fresh, unallocated clusters each round
        const fill = Buffer.from(await img.read(at, 256 * K));
        const guest = pattern(4 * K, 20 + round);
        const off = at + (round % 4) * 64 * K + 100;
        const order = round % 2 === 0
          ? [img.fillUnallocated(at, fill), img.write(off, guest)]
          : [img.write(off, guest), img.fillUnallocated(at, fill)];
        await Promise.all(order);
        const got = Buffer.from(await img.read(at, 256 * K));
        expect(got.subarray(off - at, off - at + 4 * K).equals(Buffer.from(guest)), `round ${round}`).toBe(true);
        expect(got.subarray(0, off - at).equals(fill.subarray(0, off - at))).toBe(true);
        expect(got.subarray(off - at + 4 * K).equals(fill.subarray(off - at + 4 * K))).toBe(true);
      }
      await img.close();
      if (hasQemu) expect(qemuCheckJson(join(dir, 'top.qcow2')).status).toBe(0);
    }
  });

  it('zeroUnallocated makes only unallocated clusters read as zeros, over a backing file with data (v3 and v2)', async () => {
    for (const compat of ['1.1', '0.10'] as const) {
      const dir = join(t.dir, `z${compat}`);
      await import('node:fs').then((fs) => fs.mkdirSync(dir));
      await createImage(join(dir, 'b.qcow2'), { size: 4 * M, compat });
      const b = await openImage(join(dir, 'b.qcow2'), { readOnly: false });
      await b.write(0, pattern(4 * M, 5));
      await b.close();
      await createImage(join(dir, 'o.qcow2'), { backingFile: 'b.qcow2', backingFormat: 'qcow2', compat });
      const o = await openImage(join(dir, 'o.qcow2'), { readOnly: false });
      await o.write(64 * K, pattern(64 * K, 6));
      await o.zeroUnallocated(0, 256 * K + 1000);
      const got = await o.read(0, 512 * K);
      expect(got.subarray(0, 64 * K).every((x) => x === 0)).toBe(true);
      expect(Buffer.from(got.subarray(64 * K, 128 * K)).equals(Buffer.from(pattern(64 * K, 6)))).toBe(true);
      expect(got.subarray(128 * K, 256 * K + 1000).every((x) => x === 0)).toBe(true);
      expect(Buffer.from(got.subarray(256 * K + 1000)).equals(Buffer.from(pattern(4 * M, 5).subarray(256 * K + 1000, 512 * K)))).toBe(true);
      await o.close();
      if (hasQemu) expect(qemuCheckJson(join(dir, 'o.qcow2')).status).toBe(0);
    }
  });

  it('makeEmpty unallocates everything (reads fall through); raw images refuse it', async () => {
    const { dir, top } = await rawChain();
    const mid = await openImage(join(dir, 'mid.qcow2'));
    const below = Buffer.from(await mid.read(0, 8 * M));
    await mid.close();
    await top.makeEmpty();
    expect(await top.allocatedAbove(0, 8 * M, top.backing)).toEqual([]);
    expect(Buffer.from(await top.read(0, 8 * M)).equals(below)).toBe(true);
    await expect(top.backing!.backing!.makeEmpty()).rejects.toBeInstanceOf(Unsupported);
    await top.close();
  });
});

describe('setBacking', () => {
  it('re-points an image in use and a read-only layer inside its chain, on disk and in the open chain', async () => {
    const { dir, top } = await rawChain();
    const before = Buffer.from(await top.read(0, 8 * M));
    // A read-only layer inside the chain: mid moves to a copy of its raw base.
    const mid = top.backing!;
    ok('cp', [join(dir, 'base.raw'), join(dir, 'base2.raw')]);
    await mid.setBacking({ name: 'base2.raw', format: 'raw', image: await openImage(join(dir, 'base2.raw'), { format: 'raw' }) });
    expect(top.chain.map((c) => c.filename.split('/').pop())).toEqual(['top.qcow2', 'mid.qcow2', 'base2.raw']);
    expect(top.chain[1]!.backingFilename).toBe('base2.raw');
    expect(mid.backing!.path).toBe(join(dir, 'base2.raw'));
    expect(Buffer.from(await top.read(0, 8 * M)).equals(before)).toBe(true);
    // The image in use: point it at a copy of its backing under another name.
    ok('cp', [join(dir, 'mid.qcow2'), join(dir, 'mid2.qcow2')]);
    const next = await openImage(join(dir, 'mid2.qcow2'));
    await top.setBacking({ name: 'mid2.qcow2', format: 'qcow2', image: next });
    expect(top.header!.backingFile).toBe('mid2.qcow2');
    expect(top.chain[0]!.fullBackingFilename).toBe(join(dir, 'mid2.qcow2'));
    expect(Buffer.from(await top.read(0, 8 * M)).equals(before)).toBe(true);
    await top.close();
    const again = await openImage(join(dir, 'top.qcow2'));
    expect(again.chain.map((c) => c.filename.split('/').pop())).toEqual(['top.qcow2', 'mid2.qcow2', 'base2.raw']);
    expect(Buffer.from(await again.read(0, 8 * M)).equals(before)).toBe(true);
    await again.close();
    if (hasQemu) {
      const info = JSON.parse(ok('qemu-img', ['info', '--output=json', join(dir, 'mid.qcow2')])) as Record<string, unknown>;
      expect([info['backing-filename'], info['backing-filename-format']]).toEqual(['base2.raw', 'raw']);
      expect(qemuCheckJson(join(dir, 'top.qcow2')).status).toBe(0);
    }
    const raw = await openImage(join(dir, 'base.raw'), { readOnly: false });
    await expect(raw.setBacking({ name: 'x' })).rejects.toBeInstanceOf(Unsupported);
    await raw.close();
  });
});

describe('trackWrites and pivot', () => {
  it('writes through the image are tracked until stopped; reads are not', async () => {
    const { top } = await rawChain();
    const m = top.trackWrites(64 * K);
    await top.read(0, M);
    expect(m.empty()).toBe(true);
    await top.write(100, new Uint8Array(10));
    await top.writeZeroes(2 * M, 4 * K);
    await top.discard(4 * M, 128 * K);
    expect(m.takeAll(M)).toEqual([{ start: 0, end: 64 * K }, { start: 2 * M, end: 2 * M + 64 * K }, { start: 4 * M, end: 4 * M + 128 * K }]);
    m.stop();
    await top.write(0, new Uint8Array(10));
    expect(m.empty()).toBe(true);
    expect(() => top.trackWrites(1000)).toThrow(InvalidArgument);
    await top.close();
  });

  it('a write already in flight when tracking starts is tracked', async () => {
    const { top } = await rawChain();
    const inFlight = top.write(5 * M, pattern(64 * K, 5));
    const m = top.trackWrites(64 * K);
    await inFlight;
    expect(m.takeAll(M)).toEqual([{ start: 5 * M, end: 5 * M + 64 * K }]);
    m.stop();
    await top.close();
  });

  it('pivot holds new calls, drains those in flight, runs the final step, then serves the target', async () => {
    const dir = join(t.dir, 'pivot');
    await import('node:fs').then((fs) => fs.mkdirSync(dir));
    await createImage(join(dir, 'a.qcow2'), { size: 4 * M });
    await createImage(join(dir, 'b.qcow2'), { size: 4 * M });
    const a = await openImage(join(dir, 'a.qcow2'), { readOnly: false });
    const b = await openImage(join(dir, 'b.qcow2'), { readOnly: false });
    await a.write(0, pattern(M, 1));
    // A failed final step switches nothing.
    await expect(a.pivot(b, async () => { throw new Error('no'); })).rejects.toThrow('no');
    expect(a.path).toBe(join(dir, 'a.qcow2'));
    const inFlight = a.write(M, pattern(M, 2)); // started before the pivot: lands in a
    let finalSaw = '';
    const pivoting = a.pivot(b, async (old) => {
      finalSaw = Buffer.from(await old.read(M, 16)).toString('hex');
      await b.write(0, await old.read(0, 2 * M)); // what a mirror's last pass does
    });
    const held = a.write(2 * M, pattern(M, 3)); // issued during the pivot: must go to b
    await Promise.all([inFlight, pivoting, held]);
    expect(finalSaw).toBe(Buffer.from(pattern(M, 2).subarray(0, 16)).toString('hex'));
    expect(a.path).toBe(join(dir, 'b.qcow2'));
    expect(Buffer.from(await a.read(0, 3 * M)).equals(Buffer.concat([pattern(M, 1), pattern(M, 2), pattern(M, 3)]))).toBe(true);
    expect(() => b.virtualSize).toThrow(FailedPrecondition);
    await b.close(); // taken over: a no-op
    await a.close();
    const onDisk = await openImage(join(dir, 'b.qcow2'));
    expect(Buffer.from(await onDisk.read(2 * M, M)).equals(Buffer.from(pattern(M, 3)))).toBe(true);
    await onDisk.close();
  });
});
