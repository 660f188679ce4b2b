/**
 * Durable (FUA) writes: `write(…, { fua: true })` makes the same file writes in the same order as
 * write() then flush() — the files come out byte for byte the same, with the native batch and
 * without it — and with the native helper in one call: the writes, then the fdatasync. A batch
 * that fails part-way leaves a consistent file (what a crash then would leave) and an image that
 * goes on working from what the file holds.
 */
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it, vi } from 'vitest';
import { createImage, openImage, type Image } from '../index.js';
import { ImageFile, setNativeWriteBatch } from '../engine/file.js';
import { nativeAddon, type NativeAddon } from '../engine/native-addon.js';
import { hasQemu, ok, pattern, qemuCheckJson, tempDir } from './helpers.js';

const native = nativeAddon()?.writeBatch;
type WriteBatch = NonNullable<NativeAddon['writeBatch']>;
interface Call { fd: number; ops: [number, number][]; sync: boolean }

/** The native batch write, wrapped to record every call (and, with `failAt`, to fail part-way). */
function recording(failAt?: { call: number; op: number; code?: string }): { calls: Call[]; fn: WriteBatch } {
  const calls: Call[] = [];
  const fn: WriteBatch = async (fd, positions, buffers, sync) => {
    const n = calls.push({ fd, ops: buffers.map((b, i) => [positions[i]!, b.length]), sync }) - 1;
    if (failAt && failAt.call === n) {
      // What the helper does when op `failAt.op` fails: the ops before it made, none after, no sync.
      for (let i = 0; i < failAt.op && i < buffers.length; i++) writeSync(fd, buffers[i]!, 0, buffers[i]!.length, positions[i]!);
      const what = failAt.op < buffers.length ? 'write' : 'fdatasync';
      throw Object.assign(new Error(`${what}: No space left on device`), { code: failAt.code ?? 'ENOSPC', done: Math.min(failAt.op, buffers.length) });
    }
    return native!(fd, positions, buffers, sync);
  };
  return { calls, fn };
}

const sha = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

/**
 * What each variant runs: writes over a backing file (copy-on-write of partial clusters), in
 * place, across clusters and L2 tables, into clusters shared with a snapshot (new space, the old
 * reference dropped), and enough new clusters that the refcount table grows (512-byte clusters,
 * 64-bit refcounts: a block counts 64 clusters). `durable` is the write under test.
 */
async function scenario(img: Image, durable: (off: number, data: Uint8Array) => Promise<void>): Promise<void> {
  const at = (i: number) => ((i * 7919) % 4000) * 512 + (i % 3) * 100;
  for (let i = 0; i < 60; i++) await durable(at(i), pattern(300 + (i % 5) * 700, i + 1));
  await img.snapshots.create('s1');
  for (let i = 0; i < 40; i++) await durable(at(i * 2), pattern(512 * (1 + (i % 3)), 100 + i));
  await durable(30 * 1024 - 200, pattern(5000, 7)); // across an L2 table's end (64 entries of 512 bytes)
  for (let i = 0; i < 400; i++) await durable(2 * 1024 * 1024 + i * 1024, pattern(600, 200 + i));
  await durable(0, pattern(4096, 9)); // in place by now
}

describe('durable (FUA) writes', () => {
  const t = tempDir('qcow2-fua-');
  afterAll(t.cleanup);
  afterEach(() => setNativeWriteBatch(undefined));

  /** A folder of its own with top.qcow2 over base.qcow2 (the same names each time: they are in the header). */
  async function fresh(name: string): Promise<string> {
    const dir = join(t.dir, name);
    mkdirSync(dir);
    const base = join(dir, 'base.qcow2');
    await createImage(base, { size: 4 << 20, clusterSize: 4096 });
    const b = await openImage(base, { readOnly: false });
    await b.write(0, pattern(4 << 20, 3));
    await b.close();
    const top = join(dir, 'top.qcow2');
    await createImage(top, { backingFile: 'base.qcow2', backingFormat: 'qcow2', clusterSize: 512, refcountBits: 64 });
    return top;
  }

  it('leave the file byte for byte as write then flush does, with the native batch and without', async () => {
    const files: Record<string, string> = {};
    // The snapshot's time is in the file: the same for each variant.
    vi.useFakeTimers({ toFake: ['Date'] });
    for (const variant of ['write, flush', 'fua, native', 'fua, no native'] as const) {
      vi.setSystemTime(new Date('2026-01-02T03:04:05Z'));
      const file = await fresh(variant.replace(/\W+/g, '-'));
      if (variant === 'fua, no native') setNativeWriteBatch(null);
      const img = await openImage(file, { readOnly: false });
      await scenario(img, variant === 'write, flush'
        ? async (off, data) => { await img.write(off, data); await img.flush(); }
        : (off, data) => img.write(off, data, { fua: true }));
      await img.close();
      setNativeWriteBatch(undefined);
      files[variant] = file;
    }
    vi.useRealTimers();
    const plain = files['write, flush']!;
    expect(sha(files['fua, native']!)).toBe(sha(plain));
    expect(sha(files['fua, no native']!)).toBe(sha(plain));
    if (hasQemu) {
      expect(qemuCheckJson(plain).status).toBe(0);
      expect(ok('qemu-img', ['map', '--output=json', files['fua, native']!])).toBe(ok('qemu-img', ['map', '--output=json', plain]));
    }
  });

  it.skipIf(!native)('one native call per write: refcount, cluster, L2 entry, then the fdatasync; in place, the data and the fdatasync', async () => {
    const file = join(t.dir, 'calls.qcow2');
    await createImage(file, { size: 64 << 20 });
    const img = await openImage(file, { readOnly: false });
    await img.write(0, pattern(65536, 1)); // the L2 table exists, and cluster 0 is allocated
    await img.flush();
    const rec = recording();
    setNativeWriteBatch(rec.fn);
    await img.write(5 * 65536 + 4096, pattern(4096, 2), { fua: true });
    await img.write(8192, pattern(4096, 3), { fua: true });
    setNativeWriteBatch(undefined);
    expect(rec.calls.map((c) => c.sync)).toEqual([true, true]);
    const [alloc, inPlace] = rec.calls;
    // QEMU's fresh layout: refcount block in cluster 2, L1 in 3; the L2 table and cluster 0 came next.
    const [l2, first] = [4 * 65536, 5 * 65536];
    expect(alloc!.ops).toEqual([
      [2 * 65536 + 2 * 6, 2], // the new cluster's 16-bit refcount (cluster 6)
      [6 * 65536, 65536], // the whole cluster, its zero edges with it
      [l2 + 5 * 8, 8], // the L2 entry of guest cluster 5
    ]);
    expect(inPlace!.ops).toEqual([[first + 8192, 4096]]);
    expect(Buffer.from(await img.read(5 * 65536, 65536)).equals(Buffer.concat([Buffer.alloc(4096), pattern(4096, 2), Buffer.alloc(65536 - 8192)]))).toBe(true);
    await img.close();
    if (hasQemu) expect(qemuCheckJson(file).status).toBe(0);
  });

  it.skipIf(!native)('2 MiB clusters too: the cluster (guest data, held as it is) goes in the same call', async () => {
    const file = join(t.dir, 'big-clusters.qcow2');
    await createImage(file, { size: 64 << 20, clusterSize: 2 << 20 });
    const img = await openImage(file, { readOnly: false });
    await img.write(0, pattern(4096, 1));
    const rec = recording();
    setNativeWriteBatch(rec.fn);
    await img.write(5 << 20, pattern(4096, 2), { fua: true });
    setNativeWriteBatch(undefined);
    expect(rec.calls).toHaveLength(1);
    expect(rec.calls[0]!.ops.map(([, len]) => len)).toEqual([2, 2 << 20, 8]);
    expect(rec.calls[0]!.sync).toBe(true);
    expect(Buffer.from(await img.read(5 << 20, 4096)).equals(Buffer.from(pattern(4096, 2)))).toBe(true);
    await img.close();
    if (hasQemu) expect(qemuCheckJson(file).status).toBe(0);
  });

  it.skipIf(!native)('a barrier inside a write stays one: the refcount table grows (synced) before the header points at it', async () => {
    const file = await fresh('barrier');
    const img = await openImage(file, { readOnly: false });
    const rec = recording();
    setNativeWriteBatch(rec.fn);
    // 40 × 128 new clusters: past the 4096 clusters that the first refcount table cluster covers.
    for (let i = 0; i < 40; i++) await img.write(i * 65536, pattern(65536, i), { fua: true });
    setNativeWriteBatch(undefined);
    // The header's refcount table fields (offset 48) are written only in a call after a synced one
    // that wrote the new table; every call ends with an fdatasync (its FUA, or the barrier).
    const header = rec.calls.findIndex((c) => c.ops.some(([pos]) => pos === 48));
    expect(header).toBeGreaterThan(0);
    expect(rec.calls[header - 1]!.sync).toBe(true);
    expect(rec.calls.every((c) => c.sync)).toBe(true);
    await img.close();
    if (hasQemu) expect(qemuCheckJson(file).status).toBe(0);
  });

  describe.skipIf(!native)('a batch that fails part-way', () => {
    // An allocating write's batch is [refcount, cluster, L2 entry] + fdatasync: fail at each step.
    it.each([0, 1, 2, 3])('at step %i: the write fails, the image reads as before and goes on; the file is consistent', async (step) => {
      const file = await fresh(`fail-${step}`);
      const img = await openImage(file, { readOnly: false });
      await img.write(0, pattern(2048, 1), { fua: true });
      const before = await img.read(0, 64 * 1024);
      const rec = recording({ call: 0, op: step });
      setNativeWriteBatch(rec.fn);
      await expect(img.write(10 * 1024 + 100, pattern(300, 2), { fua: true })).rejects.toMatchObject({ code: 'ENOSPC' });
      setNativeWriteBatch(undefined);
      expect(rec.calls[0]!.ops).toHaveLength(3);
      const after = await img.read(0, 64 * 1024);
      const expected = Buffer.from(before);
      if (step === 3) expected.set(pattern(300, 2), 10 * 1024 + 100); // only the fdatasync failed: the writes were made
      expect(Buffer.from(after).equals(expected)).toBe(true);
      // It goes on: more writes, allocating and in place, read back.
      await img.write(10 * 1024 + 100, pattern(300, 3), { fua: true });
      await img.write(20 * 1024, pattern(4096, 4));
      await img.write(0, pattern(100, 5), { fua: true });
      expected.set(pattern(300, 3), 10 * 1024 + 100);
      expected.set(pattern(4096, 4), 20 * 1024);
      expected.set(pattern(100, 5), 0);
      expect(Buffer.from(await img.read(0, 64 * 1024)).equals(expected)).toBe(true);
      await img.close();
      if (hasQemu) {
        const { status, json } = qemuCheckJson(file);
        expect({ corruptions: json.corruptions ?? 0, errors: json['check-errors'] ?? 0 }).toEqual({ corruptions: 0, errors: 0 });
        expect([0, 3]).toContain(status); // leaked clusters (the refcount made, the L2 entry not) are harmless
      }
      const again = await openImage(file);
      expect(Buffer.from(await again.read(0, 64 * 1024)).equals(expected)).toBe(true);
      await again.close();
    });

    it('and when the tables cannot be read back: the image refuses everything but close, and reopens fine', async () => {
      const file = await fresh('fail-reload');
      const img = await openImage(file, { readOnly: false });
      await img.write(0, pattern(2048, 1), { fua: true }); // the tables the next write needs are cached
      setNativeWriteBatch(recording({ call: 0, op: 1 }).fn);
      const readExact = ImageFile.prototype.readExact;
      ImageFile.prototype.readExact = () => Promise.reject(Object.assign(new Error('EIO: i/o error'), { code: 'EIO' }));
      try {
        await expect(img.write(10 * 1024, pattern(512, 2), { fua: true })).rejects.toMatchObject({ code: 'ENOSPC' });
      } finally {
        ImageFile.prototype.readExact = readExact;
        setNativeWriteBatch(undefined);
      }
      await expect(img.read(0, 512)).rejects.toThrow(/could not be read back/);
      await expect(img.write(0, pattern(512, 3))).rejects.toThrow(/could not be read back/);
      await img.close();
      if (hasQemu) expect([0, 3]).toContain(qemuCheckJson(file).status);
      const again = await openImage(file, { readOnly: false });
      await again.write(10 * 1024, pattern(512, 4), { fua: true });
      expect(Buffer.from(await again.read(10 * 1024, 512)).equals(Buffer.from(pattern(512, 4)))).toBe(true);
      await again.close();
    });
  });

  it('many at once, with plain writes and reads in between: every one lands, the image stays clean', async () => {
    const file = await fresh('concurrent');
    const img = await openImage(file, { readOnly: false });
    const at = (i: number) => ((i * 37) % 1000) * 4096 + (i % 4) * 1000; // disjoint for i < 1000
    for (let i = 0; i < 300; i += 5) await img.write(at(i), pattern(1000, 999)); // these are in place below
    const expected = Buffer.from(await img.read(0, 4 << 20));
    const jobs: Promise<void>[] = [];
    for (let i = 0; i < 300; i++) {
      const data = pattern(1000, i + 1);
      expected.set(data, at(i));
      jobs.push(img.write(at(i), data, { fua: i % 3 !== 2 }));
      if (i % 10 === 0) jobs.push(img.read(at(i), 4096).then(() => undefined));
    }
    await Promise.all(jobs);
    expect(Buffer.from(await img.read(0, 4 << 20)).equals(expected)).toBe(true);
    await img.close();
    if (hasQemu) expect(qemuCheckJson(file).status).toBe(0);
  });

  it('with deferred metadata: a FUA write is durable at once (another open of the file sees it)', async () => {
    const file = await fresh('deferred');
    const img = await openImage(file, { readOnly: false, deferMetadata: true });
    await img.write(8192, pattern(1024, 5));
    await img.write(100 * 1024, pattern(2048, 6), { fua: true });
    const other = await openImage(file); // reads the file as it is on disk now
    expect(Buffer.from(await other.read(100 * 1024, 2048)).equals(Buffer.from(pattern(2048, 6)))).toBe(true);
    expect(Buffer.from(await other.read(8192, 1024)).equals(Buffer.from(pattern(1024, 5)))).toBe(true); // FUA flushes what came before too
    await other.close();
    await img.close();
  });

  it('raw images: the write and the fdatasync in one call', async () => {
    const file = join(t.dir, 'disk.raw');
    await createImage(file, { format: 'raw', size: 1 << 20 });
    const img = await openImage(file, { readOnly: false, format: 'raw' });
    const rec = recording();
    if (native) setNativeWriteBatch(rec.fn);
    await img.write(4096, pattern(512, 8), { fua: true });
    setNativeWriteBatch(undefined);
    if (native) expect(rec.calls).toEqual([{ fd: expect.any(Number), ops: [[4096, 512]], sync: true }]);
    await img.close();
    expect(readFileSync(file).subarray(4096, 4608).equals(Buffer.from(pattern(512, 8)))).toBe(true);
  });
});
