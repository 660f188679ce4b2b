/**
 * `check` finds what `qemu-img check` finds, with the same counts, on images damaged in the
 * ways a crash or a bug leaves them; `-r leaks` and `-r all` repair like qemu-img.
 */
import { copyFileSync, openSync, readSync, writeSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openImage, type CheckResult } from '../../plugins/qcow2/index.js';
import { hasQemu, qemuCheckJson, qemuIo, run, tempDir, warnIfNoQemu } from '../../plugins/qcow2/test/helpers.js';

function u64(fd: number, pos: number): number {
  const b = Buffer.alloc(8);
  readSync(fd, b, 0, 8, pos);
  return Number(b.readBigUInt64BE(0));
}

/** Overwrite the 16-bit refcount of one cluster (default layout: refcount_bits=16). */
function setStoredRefcount(file: string, cluster: number, value: number): void {
  const fd = openSync(file, 'r+');
  try {
    const b = Buffer.alloc(4);
    readSync(fd, b, 0, 4, 20);
    const cs = 2 ** b.readUInt32BE(0);
    const reftable = u64(fd, 48);
    const epb = cs / 2;
    const block = u64(fd, reftable + Math.floor(cluster / epb) * 8);
    const v = Buffer.alloc(2);
    v.writeUInt16BE(value);
    writeSync(fd, v, 0, 2, block + (cluster % epb) * 2);
  } finally {
    closeSync(fd);
  }
}

/** Host cluster of the data for guest cluster 0..n via the first L2 table. */
function dataCluster(file: string, guestCluster: number): number {
  const fd = openSync(file, 'r');
  try {
    const l1 = u64(fd, 40);
    const l2 = u64(fd, l1) & 0x00ff_ffff_ffff_fe00;
    return (u64(fd, l2 + guestCluster * 8) & 0x00ff_ffff_ffff_fe00) / 65536;
  } finally {
    closeSync(fd);
  }
}

function counts(r: CheckResult) {
  return {
    'check-errors': r.checkErrors, corruptions: r.corruptions, leaks: r.leaks, 'leaks-fixed': r.leaksFixed,
    'corruptions-fixed': r.corruptionsFixed, 'image-end-offset': r.imageEndOffset, 'total-clusters': r.totalClusters,
    'allocated-clusters': r.allocatedClusters, 'fragmented-clusters': r.fragmentedClusters, 'compressed-clusters': r.compressedClusters,
  };
}

function qemuCounts(json: Record<string, unknown>) {
  const keys = ['check-errors', 'corruptions', 'leaks', 'leaks-fixed', 'corruptions-fixed', 'image-end-offset', 'total-clusters',
    'allocated-clusters', 'fragmented-clusters', 'compressed-clusters'];
  return Object.fromEntries(keys.map((k) => [k, (json[k] as number | undefined) ?? 0]));
}

function exitCode(r: CheckResult): number {
  if (r.checkErrors) return 1;
  if (r.corruptions) return 2;
  if (r.leaks) return 3;
  return 0;
}

async function ourCheck(file: string, repair?: 'leaks' | 'all'): Promise<CheckResult> {
  const img = await openImage(file, { readOnly: !repair, noBacking: true });
  try {
    return await img.check(repair ? { repair } : {});
  } finally {
    await img.close();
  }
}

describe.skipIf(!hasQemu)('check and repair agree with qemu-img check', () => {
  warnIfNoQemu('qcow2 check parity');
  const t = tempDir('qcow2-check-');
  afterAll(t.cleanup);

  /** A written image with some structure: data, a hole, a zero cluster, a discarded (freed) cluster. */
  async function base(name: string): Promise<string> {
    const file = join(t.dir, `${name}.qcow2`);
    await createImage(file, { size: 8 << 20 });
    const img = await openImage(file, { readOnly: false });
    await img.write(0, new Uint8Array(5 * 65536).fill(1));
    await img.write(2 << 20, new Uint8Array(65536 * 2).fill(2));
    await img.discard(65536, 65536);
    await img.writeZeroes(3 * 65536, 65536);
    await img.close();
    return file;
  }

  const damages: [string, (file: string) => void][] = [
    ['clean', () => {}],
    ['a leaked cluster (refcount decrement dropped)', (f) => setStoredRefcount(f, dataCluster(f, 0) + 1, 1)],
    ['a data cluster refcount too high', (f) => setStoredRefcount(f, dataCluster(f, 0), 2)],
    ['a data cluster refcount of zero', (f) => setStoredRefcount(f, dataCluster(f, 2), 0)],
    ['the L1 table refcount lost', (f) => setStoredRefcount(f, 3, 0)],
    ['leaks past the data', (f) => { setStoredRefcount(f, 40, 1); setStoredRefcount(f, 41, 3); }],
  ];

  for (const [name, damage] of damages) {
    it(`${name}: same counts, and repairs like qemu-img`, async () => {
      const file = await base(name.replace(/[^a-z0-9]+/gi, '_'));
      damage(file);
      const q = qemuCheckJson(file);
      const ours = await ourCheck(file);
      expect(counts(ours)).toEqual(qemuCounts(q.json));
      expect(exitCode(ours)).toBe(q.status);

      for (const mode of ['leaks', 'all'] as const) {
        const theirs = join(t.dir, `q-${mode}-${Math.random()}.qcow2`);
        const mine = join(t.dir, `o-${mode}-${Math.random()}.qcow2`);
        copyFileSync(file, theirs);
        copyFileSync(file, mine);
        const qr = qemuCheckJson(theirs, mode);
        const or = await ourCheck(mine, mode);
        if (qr.status === 1 && Object.keys(qr.json).length === 0) {
          // qemu-img: "Check failed" (e.g. -r leaks when the refcounts need a rebuild).
          expect(or.error).toBeDefined();
          expect(or.checkErrors).toBeGreaterThan(0);
          continue;
        }
        expect(or.error).toBeUndefined();
        expect(counts(or)['image-end-offset']).toBe(qemuCounts(qr.json)['image-end-offset']);
        const pick = (c: Record<string, unknown>) => ({ corruptions: c.corruptions, leaks: c.leaks, 'leaks-fixed': c['leaks-fixed'], 'corruptions-fixed': c['corruptions-fixed'] });
        expect(pick(counts(or))).toEqual(pick(qemuCounts(qr.json)));
        // After our repair qemu-img agrees about what is left.
        const after = qemuCheckJson(mine);
        expect({ c: after.json.corruptions ?? 0, l: after.json.leaks ?? 0 }).toEqual({ c: or.corruptions, l: or.leaks });
      }
    });
  }

  it('fragmentation counts restart at each L2 table, as in qemu-img (512-byte and 4 KiB clusters)', async () => {
    for (const cs of [512, 4096]) {
      const file = join(t.dir, `frag-${cs}.qcow2`);
      await createImage(file, { size: 64 << 20, clusterSize: cs });
      const img = await openImage(file, { readOnly: false });
      // Interleaved writes across many L2 tables.
      for (let i = 0; i < 40; i++) await img.write(((i * 7919) % 2000) * cs * 3, new Uint8Array(cs * 2).fill(i + 1));
      await img.close();
      expect(counts(await ourCheck(file))).toEqual(qemuCounts(qemuCheckJson(file).json));
    }
  });

  it('persistent bitmaps are counted like qemu-img; a read-write open keeps them (stored at close): still clean for both', async () => {
    const file = join(t.dir, 'bitmaps.qcow2');
    await createImage(file, { size: 8 << 20 });
    expect(qemuIo(file, ['write -P 1 0 1M']).status).toBe(0);
    for (const name of ['b0', 'b1']) expect(run('qemu-img', ['bitmap', '--add', '-g', '64k', file, name]).status).toBe(0);
    expect(qemuIo(file, ['write -P 2 2M 256k']).status).toBe(0);
    expect(counts(await ourCheck(file))).toEqual(qemuCounts(qemuCheckJson(file).json));
    const img = await openImage(file, { readOnly: false });
    expect(img.header!.autoclearFeatures).toBe(1n);
    await img.write(0, new Uint8Array(4096).fill(3));
    await img.close();
    const q = qemuCheckJson(file);
    expect(q.status).toBe(0);
    expect(counts(await ourCheck(file))).toEqual(qemuCounts(q.json));
  });

  it('a dirty lazy-refcounts image (qemu-io abort): same findings; opening read-write repairs it', async () => {
    const file = join(t.dir, 'lazy-dirty.qcow2');
    await createImage(file, { size: 4 << 20, lazyRefcounts: true });
    const r = qemuIo(file, ['write -P 7 0 64k', 'write -P 8 1M 128k', 'abort']);
    expect(r.status).not.toBe(0);
    const q = qemuCheckJson(file);
    const ours = await ourCheck(file);
    expect(counts(ours)).toEqual(qemuCounts(q.json));
    const img = await openImage(file, { readOnly: false });
    expect(img.header!.dirty).toBe(false);
    expect(Array.from(await img.read(1 << 20, 4))).toEqual([8, 8, 8, 8]);
    await img.close();
    const after = qemuCheckJson(file);
    expect(after.status).toBe(0);
    expect(qemuIo(file, ['read -P 7 0 64k', 'read -P 8 1M 128k']).stdout).not.toContain('fail');
  });
});
