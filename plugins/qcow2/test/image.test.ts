/** The Image API's edges: resize, read-only, ranges, closed images, raw images, probing. */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { FailedPrecondition, InvalidArgument, OutOfRange, Unsupported, NotFound } from '../../../core/index.js';
import { createImage, openImage, probeFormat } from '../index.js';
import { hasQemu, qemuCheckJson, qemuIo, tempDir } from './helpers.js';

const t = tempDir('qcow2-image-');
afterAll(t.cleanup);

describe('Image API', () => {
  it('grows (with a new L1), refuses to shrink over data, shrinks over nothing', async () => {
    const file = join(t.dir, 'resize.qcow2');
    await createImage(file, { size: 1 << 20, clusterSize: 512 });
    const img = await openImage(file, { readOnly: false });
    const l1Before = img.header!.l1Size;
    await img.resize(64 << 20);
    expect(img.virtualSize).toBe(64 << 20);
    expect(img.header!.l1Size).toBeGreaterThan(l1Before);
    await img.write((64 << 20) - 1000, new Uint8Array(1000).fill(5));
    await expect(img.resize(32 << 20)).rejects.toBeInstanceOf(OutOfRange);
    await img.discard((64 << 20) - 1024, 1024);
    await img.resize(32 << 20);
    expect(img.virtualSize).toBe(32 << 20);
    await img.resize(40 << 20);
    expect(Array.from(await img.read((40 << 20) - 4, 4))).toEqual([0, 0, 0, 0]);
    await img.close();
    if (hasQemu) {
      expect(qemuCheckJson(file).status).toBe(0);
      expect(qemuIo(file, ['read -P 0 39M 1M']).status).toBe(0);
    }
  });

  it('a grown overlay reads zeros where its bigger backing file has data (as QEMU)', async () => {
    const base = join(t.dir, 'big-base.qcow2');
    await createImage(base, { size: 4 << 20 });
    const b = await openImage(base, { readOnly: false });
    await b.write(0, new Uint8Array(4 << 20).fill(9));
    await b.close();
    const top = join(t.dir, 'small-top.qcow2');
    await createImage(top, { size: 1 << 20, backingFile: 'big-base.qcow2', backingFormat: 'qcow2', clusterSize: 4096 });
    const img = await openImage(top, { readOnly: false });
    expect((await img.read(0, 4))[0]).toBe(9);
    await img.resize(3 << 20);
    expect(Array.from(await img.read((1 << 20) - 2, 4))).toEqual([9, 9, 0, 0]);
    expect((await img.read(3 << 20 - 1, 1))[0]).toBe(0);
    await img.close();
    if (hasQemu) expect(qemuIo(top, ['read -P 0 1M 2M', 'read -P 9 0 1M']).status).toBe(0);
  });

  it('a 1 TiB sparse image opens, maps and reads at its far end without touching every cluster', async () => {
    const file = join(t.dir, 'huge.qcow2');
    await createImage(file, { size: 2 ** 40 });
    const img = await openImage(file, { readOnly: false });
    await img.write(2 ** 40 - 4096, new Uint8Array(4096).fill(3));
    const map = await img.map();
    expect(map.length).toBe(2);
    expect(map[1]).toMatchObject({ start: 2 ** 40 - 65536, length: 65536, data: true });
    expect((await img.read(2 ** 40 - 1, 1))[0]).toBe(3);
    const c = await img.check();
    expect(c.totalClusters).toBe(2 ** 24);
    expect(c.allocatedClusters).toBe(1);
    await img.close();
    if (hasQemu) expect(qemuCheckJson(file).status).toBe(0);
  });

  it('writeBehind: writes racing background writebacks all land; flush and close wait for them', async () => {
    const file = join(t.dir, 'write-behind.qcow2');
    await createImage(file, { size: 96 << 20 });
    const img = await openImage(file, { readOnly: false, deferMetadata: true, writeBehind: true });
    // 88 MiB in 1 MiB writes, 8 at a time: several 32 MiB writebacks start while writes go on.
    const writes = Array.from({ length: 88 }, (_, i) => i);
    await Promise.all(Array.from({ length: 8 }, async () => {
      for (let i = writes.shift(); i !== undefined; i = writes.shift()) {
        await img.write(i * (1 << 20), new Uint8Array(1 << 20).fill((i % 250) + 1));
      }
    }));
    await img.flush();
    await img.write(90 << 20, new Uint8Array(4096).fill(7));
    await img.close(); // with a writeback possibly still running
    const again = await openImage(file);
    for (const i of [0, 31, 32, 63, 64, 87]) expect((await again.read(i * (1 << 20) + 12345, 1))[0]).toBe((i % 250) + 1);
    expect((await again.read(90 << 20, 1))[0]).toBe(7);
    expect((await again.check()).corruptions).toBe(0);
    await again.close();
    if (hasQemu) expect(qemuCheckJson(file).status).toBe(0);
  });

  it('rejects bad requests with typed errors', async () => {
    const file = join(t.dir, 'edges.qcow2');
    await createImage(file, { size: 1 << 20 });
    const ro = await openImage(file);
    await expect(ro.write(0, new Uint8Array(1))).rejects.toBeInstanceOf(FailedPrecondition);
    await expect(ro.read(1 << 20, 1)).rejects.toBeInstanceOf(OutOfRange);
    await expect(ro.read(-1, 1)).rejects.toBeInstanceOf(InvalidArgument);
    await expect(ro.read(0.5, 1)).rejects.toBeInstanceOf(InvalidArgument);
    await ro.close();
    await expect(ro.read(0, 1)).rejects.toBeInstanceOf(FailedPrecondition);
    await expect(openImage(join(t.dir, 'missing.qcow2'))).rejects.toBeInstanceOf(NotFound);
    await expect(createImage(file, { size: 1 << 20 })).rejects.toBeInstanceOf(FailedPrecondition);
    await expect(createImage(join(t.dir, 'x.qcow2'), { size: 1, clusterSize: 1000 })).rejects.toBeInstanceOf(InvalidArgument);
    await expect(createImage(join(t.dir, 'y.qcow2'), { size: 1, compat: '0.10', refcountBits: 8 })).rejects.toBeInstanceOf(InvalidArgument);
    await expect(createImage(join(t.dir, 'z.qcow2'), {})).rejects.toBeInstanceOf(InvalidArgument);
  });

  it('raw images: read/write/zero, probing, no snapshots, no check', async () => {
    const file = join(t.dir, 'disk.raw');
    await createImage(file, { format: 'raw', size: 1 << 20 });
    expect(await probeFormat(file)).toBe('raw');
    const img = await openImage(file, { readOnly: false });
    expect(img.format).toBe('raw');
    await img.write(4096, new Uint8Array(100).fill(7));
    await img.writeZeroes(4096, 10);
    expect(Array.from(await img.read(4096 + 8, 4))).toEqual([0, 0, 7, 7]);
    const map = await img.map();
    expect(map.some((s) => s.data && s.start <= 4096 && s.start + s.length > 4096)).toBe(true);
    await expect(img.snapshots.create('s')).rejects.toBeInstanceOf(Unsupported);
    await expect(img.check()).rejects.toBeInstanceOf(Unsupported);
    await img.close();
    const q = join(t.dir, 'probe.qcow2');
    await createImage(q, { size: 1 << 20 });
    expect(await probeFormat(q)).toBe('qcow2');
  });

  it('a snapshot needs wider refcounts than 1 bit', async () => {
    const file = join(t.dir, 'rc1.qcow2');
    await createImage(file, { size: 1 << 20, refcountBits: 1 });
    const img = await openImage(file, { readOnly: false });
    await img.write(0, new Uint8Array(10).fill(1));
    await expect(img.snapshots.create('s')).rejects.toBeInstanceOf(Unsupported);
    await expect(img.snapshots.apply('nope')).rejects.toBeInstanceOf(NotFound);
    await img.close();
  });

  it('a header rewrite keeps unknown header fields and unknown extensions (and qemu-img accepts it)', async () => {
    const file = join(t.dir, 'unknown-ext.qcow2');
    await createImage(file, { size: 1 << 20 });
    const { readFileSync } = await import('node:fs');
    const { decodeHeader, encodeHeader } = await import('../format/header.js');
    const bytes = readFileSync(file);
    const h = decodeHeader(bytes);
    h.unknownFields = Uint8Array.from([0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1]);
    h.extensions.push({ type: 0x7a7a7a7a, data: Uint8Array.from([1, 2, 3]) });
    h.incompatibleFeatures |= 1n; // dirty: a read-write open must repair and rewrite the header
    Buffer.from(encodeHeader(h)).copy(bytes, 0);
    writeFileSync(file, bytes);
    const img = await openImage(file, { readOnly: false });
    await img.write(0, new Uint8Array(10).fill(1));
    await img.close();
    const after = decodeHeader(readFileSync(file));
    expect(after.incompatibleFeatures).toBe(0n);
    expect(Array.from(after.unknownFields)).toEqual([0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1]);
    expect(after.headerLength).toBe(120);
    expect(after.extensions.find((e) => e.type === 0x7a7a7a7a)?.data).toEqual(Uint8Array.from([1, 2, 3]));
    if (hasQemu) expect(qemuCheckJson(file).status).toBe(0);
  });

  it('opens a v3 header of 104 bytes (older QEMU) and rewrites it as 112', async () => {
    const file = join(t.dir, 'h104.qcow2');
    await createImage(file, { size: 1 << 20, lazyRefcounts: true });
    const img0 = await openImage(file);
    expect(img0.header!.headerLength).toBe(112);
    await img0.close();
    // Set the dirty bit so that a read-write open repairs and rewrites the header.
    const { readFileSync } = await import('node:fs');
    const b = readFileSync(file);
    b.writeBigUInt64BE(1n, 72);
    writeFileSync(file, b);
    const img = await openImage(file, { readOnly: false });
    expect(img.header!.dirty).toBe(false);
    await img.close();
    const again = await openImage(file);
    expect(again.header!.dirty).toBe(false);
    expect(again.header!.lazyRefcounts).toBe(true);
    await again.close();
  });
});
