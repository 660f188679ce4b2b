import { createRequire } from 'node:module';
import { beforeAll, describe, expect, it } from 'vitest';
import { Corrupt } from '../../../core/index.js';
import { zstdDecompressCluster } from '../engine/zstd.js';

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

describe('zstd clusters (the decoder)', () => {
  beforeAll(() => z.init());

  it('one frame followed by the next cluster\'s bytes (the L2 entry counts whole sectors): the frame alone is decoded', async () => {
    const a = cluster(1);
    const frame = z.compress(a, 3);
    expect(frame.length).toBeLessThan(CS / 2);
    const out = await zstdDecompressCluster(cat(frame, z.compress(cluster(2), 3), new Uint8Array(300).fill(0xab)), CS, 'img');
    expect(Buffer.from(out).equals(Buffer.from(a))).toBe(true);
  });

  it('a cluster in several frames, a skippable frame between them (what a zstd stream may hold): decoded in order', async () => {
    const a = cluster(3);
    const skippable = cat(new Uint8Array([0x5e, 0x2a, 0x4d, 0x18, 5, 0, 0, 0]), new Uint8Array(5).fill(1));
    const out = await zstdDecompressCluster(cat(z.compress(a.subarray(0, 20000), 3), skippable, z.compress(a.subarray(20000), 1), new Uint8Array(7)), CS, 'img');
    expect(Buffer.from(out).equals(Buffer.from(a))).toBe(true);
  });

  it('damage is Corrupt naming the image: no magic, a reserved bit, truncated, a frame larger than the cluster, too little data', async () => {
    const frame = z.compress(cluster(4), 3);
    const reserved = Buffer.from(frame);
    reserved[4]! |= 0x08;
    const cases: [string, Uint8Array, number, RegExp][] = [
      ['no magic', cat(new Uint8Array(4), frame), CS, /no frame magic/],
      ['reserved bit', reserved, CS, /reserved bit/],
      ['truncated', frame.subarray(0, frame.length - 10), CS, /truncated/],
      ['frame larger than the cluster', z.compress(new Uint8Array(2 * CS).fill(3), 3), CS, /more than|frame of \d+ bytes/],
      ['half a cluster, then nothing', z.compress(cluster(5).subarray(0, CS / 2), 3), CS, /truncated|no frame magic/],
      ['garbage inside a block', cat(frame.subarray(0, 20), new Uint8Array(frame.length - 20).fill(0xee)), CS, /zstd cluster data/],
    ];
    for (const [what, data, cs, re] of cases) {
      const e = await zstdDecompressCluster(data, cs, 'img.qcow2').then(() => undefined, (x: unknown) => x);
      expect(e, what).toBeInstanceOf(Corrupt);
      expect((e as Error).message, what).toMatch(/^img\.qcow2: /);
      expect((e as Error).message, what).toMatch(re);
    }
  });
});
