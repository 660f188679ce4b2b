/**
 * Image.writeCompressed: compressed clusters packed into shared host clusters (and across one
 * into the next), refcounts as qemu-img check counts them, a freed host cluster (a discard, a
 * snapshot applied) never written into again as a compressed cluster's tail, refcounts that cannot count past 1, and refusals.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../index.js';
import { hasQemu, ok, qemuCheckJson, tempDir, warnIfNoQemu } from './helpers.js';

const KiB = 1024;
const CS = 64 * KiB;
const { dir, cleanup } = tempDir('qcow2-compressed-');
afterAll(cleanup);
warnIfNoQemu('compressed writes (qemu-img check and compare)');

/** A cluster that deflates to roughly `fill` of its size: random bytes, then a run of one value. */
function cluster(seed: number, fill: number): Uint8Array {
  const b = new Uint8Array(CS).fill(seed & 0xff);
  let x = seed * 2654435761 >>> 0;
  for (let i = 0; i < Math.floor(CS * fill); i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

async function expectClean(file: string): Promise<void> {
  if (!hasQemu) return;
  const { status, json } = qemuCheckJson(file);
  expect(status, JSON.stringify(json)).toBe(0);
  expect(json['corruptions'] ?? 0).toBe(0);
  expect(json['leaks'] ?? 0).toBe(0);
  expect(json['compressed-clusters']).toBeGreaterThan(0);
}

describe('Image.writeCompressed', () => {
  it('packs clusters of different sizes into shared host clusters, some across two; reads back; qemu-img agrees', async () => {
    const file = join(dir, 'packed.qcow2');
    await createImage(file, { size: 64 * CS, clusterSize: CS });
    const written: Uint8Array[] = [];
    const img = await openImage(file, { readOnly: false });
    try {
      // 0.3 to 0.7 of a cluster each: two or three share a host cluster, and some cross into the next.
      for (let i = 0; i < 24; i++) {
        written.push(cluster(i + 1, 0.3 + (i % 5) * 0.1));
        await img.writeCompressed(i * CS, written[i]!);
      }
      expect((await img.check()).corruptions).toBe(0);
      for (let i = 0; i < 24; i++) expect(Buffer.from(await img.read(i * CS, CS)).equals(Buffer.from(written[i]!))).toBe(true);
      const status = await img.blockStatus(0, 24 * CS);
      expect(status.every((s) => s.compressed && s.data)).toBe(true);
    } finally {
      await img.close();
    }
    await expectClean(file);
    // Fewer host clusters than guest clusters: they are shared.
    if (hasQemu) expect(Number(/Image end offset: (\d+)/.exec(ok('qemu-img', ['check', file]))![1])).toBeLessThan(4 * CS + 24 * CS * 0.6);
  });

  it('a host cluster freed under the last compressed cluster (a discard) is not written into by the next', async () => {
    const file = join(dir, 'freed.qcow2');
    await createImage(file, { size: 16 * CS, clusterSize: CS });
    const img = await openImage(file, { readOnly: false });
    const a = cluster(7, 0.2);
    const plain = cluster(8, 1);
    const b = cluster(9, 0.2);
    try {
      await img.writeCompressed(0, a); // its host cluster holds it alone, with room after it
      await img.discard(0, CS); // freed: refcount 0
      await img.write(CS, plain); // a normal cluster: may take the freed host cluster
      await img.writeCompressed(2 * CS, b); // must not go after `a`'s old bytes
      expect(Buffer.from(await img.read(CS, CS)).equals(Buffer.from(plain))).toBe(true);
      expect(Buffer.from(await img.read(2 * CS, CS)).equals(Buffer.from(b))).toBe(true);
      expect((await img.check()).corruptions).toBe(0);
    } finally {
      await img.close();
    }
    await expectClean(file);
  });

  it('a host cluster freed by a snapshot applied (refcounts rebuilt) is not written into by the next either', async () => {
    const file = join(dir, 'applied.qcow2');
    await createImage(file, { size: 64 * CS, clusterSize: CS });
    const img = await openImage(file, { readOnly: false });
    const plain = (i: number) => cluster(200 + i, 1);
    try {
      await img.write(0, cluster(100, 1));
      await img.snapshots.create('s1');
      await img.writeCompressed(CS, cluster(1, 0.2));
      await img.snapshots.apply('s1'); // the compressed cluster's host cluster is free again
      for (let i = 2; i < 12; i++) await img.write(i * CS, plain(i));
      const b = cluster(2, 0.2);
      await img.writeCompressed(20 * CS, b);
      for (let i = 2; i < 12; i++) expect(Buffer.from(await img.read(i * CS, CS)).equals(Buffer.from(plain(i))), `cluster ${i}`).toBe(true);
      expect(Buffer.from(await img.read(20 * CS, CS)).equals(Buffer.from(b))).toBe(true);
    } finally {
      await img.close();
    }
    await expectClean(file);
  });

  it('with 1-bit refcounts every compressed cluster has a host cluster of its own; an image opened again packs after nothing old', async () => {
    const file = join(dir, 'refcount1.qcow2');
    await createImage(file, { size: 16 * CS, clusterSize: CS, refcountBits: 1 });
    let img = await openImage(file, { readOnly: false });
    try {
      for (let i = 0; i < 4; i++) await img.writeCompressed(i * CS, cluster(20 + i, 0.2));
    } finally {
      await img.close();
    }
    await expectClean(file);
    const file2 = join(dir, 'reopened.qcow2');
    await createImage(file2, { size: 16 * CS, clusterSize: CS });
    for (let round = 0; round < 2; round++) {
      img = await openImage(file2, { readOnly: false });
      try {
        for (let i = 0; i < 3; i++) await img.writeCompressed((round * 3 + i) * CS, cluster(40 + round * 3 + i, 0.3));
      } finally {
        await img.close();
      }
    }
    img = await openImage(file2, { readOnly: true });
    try {
      for (let i = 0; i < 6; i++) expect(Buffer.from(await img.read(i * CS, CS)).equals(Buffer.from(cluster(40 + i, 0.3)))).toBe(true);
    } finally {
      await img.close();
    }
    await expectClean(file2);
  });

  it('refuses an allocated cluster, a range that is not whole clusters, and raw images', async () => {
    const file = join(dir, 'refuse.qcow2');
    await createImage(file, { size: 4 * CS + 512, clusterSize: CS });
    const img = await openImage(file, { readOnly: false });
    try {
      await img.write(0, cluster(1, 1));
      await expect(img.writeCompressed(0, cluster(2, 0.2))).rejects.toMatchObject({ code: 'FailedPrecondition' });
      await expect(img.writeCompressed(512, new Uint8Array(CS))).rejects.toMatchObject({ code: 'InvalidArgument' });
      // The last, partial cluster ends at the virtual size: taken.
      await img.writeCompressed(4 * CS, new Uint8Array(512).fill(3));
      expect(Buffer.from(await img.read(4 * CS, 512)).every((x) => x === 3)).toBe(true);
    } finally {
      await img.close();
    }
    const raw = join(dir, 'refuse.raw');
    await createImage(raw, { format: 'raw', size: CS });
    const r = await openImage(raw, { readOnly: false });
    try {
      await expect(r.writeCompressed(0, new Uint8Array(CS))).rejects.toMatchObject({ code: 'Unsupported' });
    } finally {
      await r.close();
    }
  });
});
