/**
 * What a write waits for: the lock an allocating write takes in write-through mode, the order of
 * one file's writes (small ones do not queue behind large ones), and deferred metadata switched on
 * and off on an open image. Each case would hang (and so fail) if the write waited where it must not.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../index.js';
import { ImageHandle } from '../engine/image-handle.js';
import { ImageFile, setNativeWriteBatch } from '../engine/file.js';
import { hasQemu, pattern, qemuCheckJson, tempDir, warnIfNoQemu } from './helpers.js';

const KiB = 1024;
const { dir, cleanup } = tempDir('qcow2-write-paths-');
afterAll(cleanup);
warnIfNoQemu('write-paths (qemu-img check)');

/** Let other I/O and timers run. */
const tick = () => new Promise((r) => setTimeout(r, 20));

/** The image state's lock (white-box: what the write paths take). */
interface SharedLock { shared<T>(fn: () => Promise<T>): Promise<T> }
function stateLock(img: Awaited<ReturnType<typeof openImage>>): SharedLock {
  return (ImageHandle.nodeOf(img) as unknown as { s: { lock: SharedLock } }).s.lock;
}

describe('allocating writes in write-through mode', () => {
  it('a write into a cluster with nothing behind it goes on while the lock is held shared (a flush\'s sync, a read); one that frees a cluster waits', async () => {
    const file = join(dir, 'shared.qcow2');
    await createImage(file, { size: 4 << 20, clusterSize: 64 * KiB });
    const img = await openImage(file, { readOnly: false });
    await img.write(0, pattern(64 * KiB, 1));
    await img.writeZeroes(3 << 20, 64 * KiB); // a zero cluster with no host cluster behind it
    await img.snapshots.create('s1'); // cluster 0 is now shared with the snapshot: a write to it frees a reference
    let release!: () => void;
    const held = stateLock(img).shared(() => new Promise<void>((r) => (release = r)));
    await tick();
    // Fresh clusters (unallocated, and a zero cluster with no host cluster), partial and whole: done while held.
    await img.write(1 << 20, pattern(4 * KiB, 2));
    await img.write(2 << 20, pattern(128 * KiB, 3));
    await img.write((3 << 20) + 8 * KiB, pattern(4 * KiB, 5));
    let cowDone = false;
    const cow = img.write(0, pattern(4 * KiB, 4)).then(() => { cowDone = true; });
    await tick();
    expect(cowDone).toBe(false); // copy-on-write of a shared cluster: exclusive, after the holder
    release();
    await held;
    await cow;
    expect(Buffer.from(await img.read(1 << 20, 4 * KiB)).equals(Buffer.from(pattern(4 * KiB, 2)))).toBe(true);
    expect(Buffer.from(await img.read(2 << 20, 128 * KiB)).equals(Buffer.from(pattern(128 * KiB, 3)))).toBe(true);
    const zeroCluster = Buffer.from(await img.read(3 << 20, 64 * KiB));
    expect(zeroCluster.subarray(8 * KiB, 12 * KiB).equals(Buffer.from(pattern(4 * KiB, 5)))).toBe(true);
    expect(zeroCluster.subarray(0, 8 * KiB).every((b) => b === 0) && zeroCluster.subarray(12 * KiB).every((b) => b === 0)).toBe(true);
    expect(Buffer.from(await img.read(0, 4 * KiB)).equals(Buffer.from(pattern(4 * KiB, 4)))).toBe(true);
    expect(Buffer.from(await img.read(4 * KiB, 60 * KiB)).equals(Buffer.from(pattern(64 * KiB, 1).subarray(4 * KiB)))).toBe(true);
    await img.close();
    if (hasQemu) expect(qemuCheckJson(file).status).toBe(0);
  });
});

describe('ImageFile: the order of one file\'s writes', () => {
  it('a small write does not wait for a large one before it; an overlapping one and a large one do; a durable batch waits for all', async () => {
    const path = join(dir, 'order.bin');
    const f = await ImageFile.create(path, true);
    // The large write is a native batch (two ops): hold it inside the "kernel" until released.
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const calls: string[] = [];
    setNativeWriteBatch(async (fd, positions, buffers, sync) => {
      calls.push(`${positions.length} ops${sync ? ' + sync' : ''}`);
      if (positions.length === 2) await gate;
      const { writeSync, fdatasyncSync } = await import('node:fs');
      for (let i = 0; i < positions.length; i++) writeSync(fd, buffers[i]!, 0, buffers[i]!.length, positions[i]!);
      if (sync) fdatasyncSync(fd);
    });
    try {
      const large = f.writeBatch([[0, new Uint8Array(512 * KiB).fill(1)], [512 * KiB, new Uint8Array(512 * KiB).fill(1)]], false);
      await tick();
      expect(calls).toEqual(['2 ops']);
      await f.write(2 << 20, new Uint8Array(4 * KiB).fill(2)); // small, elsewhere: done while the large one is held
      const done: string[] = [];
      const overlapping = f.write(4 * KiB, new Uint8Array(4 * KiB).fill(3)).then(() => done.push('overlapping'));
      const large2 = f.write(3 << 20, new Uint8Array(128 * KiB).fill(4)).then(() => done.push('large'));
      const durable = f.writeBatch([[(4 << 20), new Uint8Array(4 * KiB).fill(5)]], true).then(() => done.push('durable'));
      await tick();
      expect(done).toEqual([]);
      release();
      await Promise.all([large, overlapping, large2, durable]);
      expect(done.indexOf('durable')).toBe(2); // after both writes called before it
      // The overlapping write landed after the large one it overlaps.
      const got = Buffer.alloc(4 * KiB);
      const { openSync, readSync, closeSync } = await import('node:fs');
      const fd = openSync(path, 'r');
      readSync(fd, got, 0, got.length, 4 * KiB);
      closeSync(fd);
      expect(got.every((b) => b === 3)).toBe(true);
    } finally {
      setNativeWriteBatch(undefined);
      release();
      await f.close();
    }
  });
});

describe('deferred metadata switched on an open image', () => {
  it('on: writes reach the file\'s metadata only at a flush or when switched off; off writes what is held, and the image checks clean', async () => {
    const file = join(dir, 'defer.qcow2');
    await createImage(file, { size: 8 << 20, clusterSize: 64 * KiB });
    const img = await openImage(file, { readOnly: false });
    const seen = async (offset: number) => {
      const r = await openImage(file, { readOnly: true });
      try {
        return Buffer.from(await r.read(offset, 4 * KiB));
      } finally {
        await r.close();
      }
    };
    await img.write(0, pattern(4 * KiB, 1));
    expect((await seen(0)).equals(Buffer.from(pattern(4 * KiB, 1)))).toBe(true); // written through
    await img.setDeferMetadata(true);
    await img.write(1 << 20, pattern(4 * KiB, 2));
    await img.write(5 << 20, pattern(4 * KiB, 3)); // a second L2 range
    expect((await seen(1 << 20)).every((b) => b === 0)).toBe(true); // its L2 entry is held in memory
    await img.flushMetadata();
    expect((await seen(1 << 20)).equals(Buffer.from(pattern(4 * KiB, 2)))).toBe(true);
    await img.write(2 << 20, pattern(4 * KiB, 4));
    expect((await seen(2 << 20)).every((b) => b === 0)).toBe(true);
    await img.setDeferMetadata(false); // writes what is held
    expect((await seen(2 << 20)).equals(Buffer.from(pattern(4 * KiB, 4)))).toBe(true);
    await img.write(3 << 20, pattern(4 * KiB, 5));
    expect((await seen(3 << 20)).equals(Buffer.from(pattern(4 * KiB, 5)))).toBe(true); // written through again
    await img.close();
    if (hasQemu) expect(qemuCheckJson(file).status).toBe(0);
  });
});
