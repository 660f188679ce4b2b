/**
 * Many async readers and writers on one open image, against an in-memory model. Ops in one
 * batch run concurrently and touch disjoint byte ranges (often inside the same cluster, so
 * allocation and copy-on-write race); every read must equal the model, and the final image
 * must pass `qemu-img check` and compare equal to a raw copy of the model.
 */
import { copyFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openImage, type CreateOptions } from '../index.js';
import { hasQemu, pattern, qemuCheckJson, run, tempDir, warnIfNoQemu } from './helpers.js';

type Op = { kind: 'read' | 'write' | 'zero' | 'discard'; off: number; len: number; seed: number };

function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    return s / 0x1_0000_0000;
  };
}

type CaseOptions = CreateOptions & { withBacking: boolean; snapshotAt?: number; deferMetadata?: boolean };

async function campaign(dir: string, name: string, opts: CaseOptions, seed: number) {
  const size = 4 << 20;
  const cs = opts.clusterSize!;
  const file = join(dir, `${name}.qcow2`);
  const model = new Uint8Array(size);
  if (opts.withBacking) {
    const base = join(dir, `${name}-base.qcow2`);
    await createImage(base, { size, clusterSize: 65536 });
    const b = await openImage(base, { readOnly: false });
    const content = pattern(size / 2, seed + 1);
    await b.write(size / 4, content);
    model.set(content, size / 4);
    await b.close();
    await createImage(file, { ...opts, backingFile: `${name}-base.qcow2`, backingFormat: 'qcow2', size });
  } else {
    await createImage(file, { ...opts, size });
  }
  // Deferred metadata with a tiny cache: batches are flushed while other requests are in flight.
  const img = await openImage(file, { readOnly: false, ...(opts.deferMetadata ? { deferMetadata: true, cacheBytes: 16 * 1024 } : {}) });
  const r = rng(seed);
  const batches = 40;
  let reads = 0;
  let atSnapshot: Uint8Array | undefined;
  for (let batch = 0; batch < batches; batch++) {
    if (opts.snapshotAt === batch) {
      await img.snapshots.create('snap');
      atSnapshot = model.slice();
    }
    const ops: Op[] = [];
    for (let tries = 0; ops.length < 10 && tries < 100; tries++) {
      const x = r();
      const kind: Op['kind'] = x < 0.35 ? 'read' : x < 0.75 ? 'write' : x < 0.88 ? 'zero' : 'discard';
      let off = Math.floor(r() * size);
      let len = 1 + Math.floor(r() * 3 * cs);
      if (kind === 'discard') {
        // Discard acts on whole clusters only.
        off = Math.floor(off / cs) * cs;
        len = cs * (1 + Math.floor(r() * 3));
      }
      len = Math.min(len, size - off);
      if (len <= 0) continue;
      const overlaps = ops.some((o) => off < o.off + o.len && o.off < off + len && !(o.kind === 'read' && kind === 'read'));
      if (!overlaps) ops.push({ kind, off, len, seed: Math.floor(r() * 1e9) });
    }
    const results = await Promise.all(ops.map(async (o) => {
      switch (o.kind) {
        case 'read': return img.read(o.off, o.len);
        case 'write': await img.write(o.off, pattern(o.len, o.seed)); return undefined;
        case 'zero': await img.writeZeroes(o.off, o.len); return undefined;
        case 'discard': await img.discard(o.off, o.len); return undefined;
      }
    }));
    ops.forEach((o, i) => {
      if (o.kind === 'read') {
        reads++;
        const got = results[i]!;
        const want = model.subarray(o.off, o.off + o.len);
        const bad = got.findIndex((v, k) => v !== want[k]);
        expect(bad, `batch ${batch} read ${o.off}+${o.len} differs at +${bad}`).toBe(-1);
      }
    });
    for (const o of ops) {
      if (o.kind === 'write') model.set(pattern(o.len, o.seed), o.off);
      else if (o.kind === 'zero' || o.kind === 'discard') model.fill(0, o.off, o.off + o.len);
    }
  }
  const whole = await img.read(0, size);
  expect(Buffer.from(whole).equals(Buffer.from(model))).toBe(true);
  const ours = await img.check();
  expect({ corruptions: ours.corruptions, leaks: ours.leaks, errors: ours.checkErrors }).toEqual({ corruptions: 0, leaks: 0, errors: 0 });
  await img.close();
  if (atSnapshot) {
    // The snapshot must still hold what the image held when it was taken.
    const copy = join(dir, `${name}-applied.qcow2`);
    copyFileSync(file, copy);
    const c = await openImage(copy, { readOnly: false });
    await c.snapshots.apply('snap');
    const got = await c.read(0, size);
    await c.close();
    expect(Buffer.from(got).equals(Buffer.from(atSnapshot))).toBe(true);
  }
  return { file, model, reads };
}

describe('concurrent readers and writers on one image', () => {
  warnIfNoQemu('concurrency (qemu-img check/compare part)');
  const t = tempDir('qcow2-conc-');
  afterAll(t.cleanup);

  const cases: [string, CaseOptions][] = [
    ['v3-4k-backed', { clusterSize: 4096, withBacking: true }],
    ['v3-4k-backed-deferred-metadata', { clusterSize: 4096, withBacking: true, deferMetadata: true }],
    ['v2-512-snapshot-deferred-metadata', { clusterSize: 512, compat: '0.10', withBacking: false, snapshotAt: 20, deferMetadata: true }],
    ['v2-512-snapshot', { clusterSize: 512, compat: '0.10', withBacking: false, snapshotAt: 20 }],
    ['v3-64k-refcount2-snapshot', { clusterSize: 65536, refcountBits: 2, withBacking: true, snapshotAt: 10 }],
  ];
  for (const [name, opts] of cases) {
    it(name, async () => {
      const seed = 0x5eed + name.length;
      const { file, model, reads } = await campaign(t.dir, name, opts, seed);
      expect(reads).toBeGreaterThan(50);
      if (!hasQemu) return;
      const { status, json } = qemuCheckJson(file);
      expect({ status, c: json.corruptions ?? 0, l: json.leaks ?? 0 }).toEqual({ status: 0, c: 0, l: 0 });
      const raw = join(t.dir, `${name}.raw`);
      writeFileSync(raw, model);
      const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, file]);
      expect(cmp.stdout.trim()).toBe('Images are identical.');
    });
  }
});
