import { createRequire } from 'node:module';
import { describe, expect, it } from 'vitest';
import { Corrupt } from '../../../core/index.js';
import { zstdCompressCluster, zstdDecompressCluster } from '../engine/zstd.js';

type ZstdWasm = typeof import('@bokuweb/zstd-wasm');
const z = createRequire(import.meta.url)('@bokuweb/zstd-wasm') as ZstdWasm;
const CS = 65536;

/** A cluster of varied text (entropy-coded blocks, not a run of one byte). */
function cluster(seed: number): Uint8Array {
  const out = new Uint8Array(CS);
  let x = seed;
  for (let i = 0; i < CS; i++) out[i] = 97 + ((x = (x * 1103515245 + 12345) & 0x7fffffff) % 7);
  return out;
}
const cat = (...parts: Uint8Array[]) => Buffer.concat(parts);

/** One zstd frame of `data` (the engine's encoder: zstd's default level). */
async function frame(data: Uint8Array): Promise<Uint8Array> {
  const f = await zstdCompressCluster(data);
  if (!f) throw new Error('does not compress');
  return f;
}

describe('zstd clusters (the decoder)', () => {
  it('one frame followed by the next cluster\'s bytes (the L2 entry counts whole sectors): the frame alone is decoded', async () => {
    const a = cluster(1);
    const one = await frame(a);
    expect(one.length).toBeLessThan(CS / 2);
    const out = await zstdDecompressCluster(cat(one, await frame(cluster(2)), new Uint8Array(300).fill(0xab)), CS, 'img');
    expect(Buffer.from(out).equals(Buffer.from(a))).toBe(true);
  });

  it('a cluster in several frames, a skippable frame between them (what a zstd stream may hold): decoded in order', async () => {
    const a = cluster(3);
    const skippable = cat(new Uint8Array([0x5e, 0x2a, 0x4d, 0x18, 5, 0, 0, 0]), new Uint8Array(5).fill(1));
    const out = await zstdDecompressCluster(cat(await frame(a.subarray(0, 20000)), skippable, await frame(a.subarray(20000)), new Uint8Array(7)), CS, 'img');
    expect(Buffer.from(out).equals(Buffer.from(a))).toBe(true);
  });

  it('damage is Corrupt naming the image: no magic, a reserved bit, truncated, a frame larger than the cluster, too little data', async () => {
    const f = await frame(cluster(4));
    const reserved = Buffer.from(f);
    reserved[4]! |= 0x08;
    const cases: [string, Uint8Array, number, RegExp][] = [
      ['no magic', cat(new Uint8Array(4), f), CS, /no frame magic/],
      ['reserved bit', reserved, CS, /reserved bit/],
      ['truncated', f.subarray(0, f.length - 10), CS, /truncated/],
      ['frame larger than the cluster', await frame(new Uint8Array(2 * CS).fill(3)), CS, /more than|frame of \d+ bytes/],
      ['half a cluster, then nothing', await frame(cluster(5).subarray(0, CS / 2)), CS, /truncated|no frame magic/],
      ['garbage inside a block', cat(f.subarray(0, 20), new Uint8Array(f.length - 20).fill(0xee)), CS, /zstd cluster data/],
    ];
    for (const [what, data, cs, re] of cases) {
      const e = await zstdDecompressCluster(data, cs, 'img.qcow2').then(() => undefined, (x: unknown) => x);
      expect(e, what).toBeInstanceOf(Corrupt);
      expect((e as Error).message, what).toMatch(/^img\.qcow2: /);
      expect((e as Error).message, what).toMatch(re);
    }
  });
  it('another user of the zstd package in the process (its init() again) leaves the engine\'s codec as it was (an instance of its own)', async () => {
    const a = cluster(6);
    const f1 = (await zstdCompressCluster(a))!;
    expect(Buffer.from(await zstdDecompressCluster(f1, CS, 'img')).equals(Buffer.from(a))).toBe(true);
    // Twice, as two users of the package would (its own wrappers then misbehave: not ours).
    await z.init();
    await z.init();
    await new Promise((r) => setTimeout(r, 200)); // the package's instance is replaced after its init() resolves
    const f2 = (await zstdCompressCluster(a))!;
    expect(Buffer.from(f2).equals(Buffer.from(f1))).toBe(true);
    expect(Buffer.from(await zstdDecompressCluster(f1, CS, 'img')).equals(Buffer.from(a))).toBe(true);
  });

});
