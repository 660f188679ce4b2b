/**
 * Interop with qemu-img/qemu-io 7.2, both directions, for each image flavour: images qemu made
 * and wrote are read by us (map JSON equal, whole content equal to `qemu-img convert -O raw`);
 * images we made and wrote pass `qemu-img check` and read back right through qemu.
 */
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openImage, type CreateOptions, type Image } from '../../plugins/qcow2/index.js';
import {
  hasQemu, mapAsQemuJson, ok, qemuCheckJson, qemuIo, run, tempDir, warnIfNoQemu,
} from '../../plugins/qcow2/test/helpers.js';

type Op = { op: 'write'; off: number; len: number; pat: number } | { op: 'zero' | 'discard'; off: number; len: number };

/** A write sequence scaled to the cluster size: partial clusters, COW, zero writes, discards, the last byte. */
function scenario(cs: number, size: number): Op[] {
  return [
    { op: 'write', off: 0, len: 3 * cs + 100, pat: 0x11 },
    { op: 'write', off: cs / 2, len: cs, pat: 0x22 },
    { op: 'zero', off: 2 * cs, len: cs },
    { op: 'zero', off: 5 * cs + 7, len: 200 },
    { op: 'write', off: 8 * cs, len: 4 * cs, pat: 0x33 },
    { op: 'discard', off: 9 * cs, len: cs },
    { op: 'write', off: size - 2 * cs + 5, len: 2 * cs - 5, pat: 0x44 },
    { op: 'write', off: 20 * cs + 1, len: 1, pat: 0x55 },
  ];
}

function qemuCmd(o: Op): string {
  if (o.op === 'write') return `write -P ${o.pat} ${o.off} ${o.len}`;
  if (o.op === 'zero') return `write -z ${o.off} ${o.len}`;
  return `discard ${o.off} ${o.len}`;
}

async function applyOurs(img: Image, ops: Op[]): Promise<void> {
  for (const o of ops) {
    if (o.op === 'write') await img.write(o.off, new Uint8Array(o.len).fill(o.pat));
    else if (o.op === 'zero') await img.writeZeroes(o.off, o.len);
    else await img.discard(o.off, o.len);
  }
}

function qemuRaw(file: string, dir: string): Buffer {
  const out = join(dir, `raw-${Math.random().toString(36).slice(2)}.raw`);
  ok('qemu-img', ['convert', '-O', 'raw', file, out]);
  return readFileSync(out);
}

function firstDiff(a: Uint8Array, b: Uint8Array): string {
  if (a.length !== b.length) return `length ${a.length} vs ${b.length}`;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return `first difference at byte ${i}: ${a[i]} vs ${b[i]}`;
  return 'equal';
}

async function readAll(img: Image): Promise<Uint8Array> {
  const out = new Uint8Array(img.virtualSize);
  const step = 1 << 20;
  for (let p = 0; p < img.virtualSize; p += step) out.set(await img.read(p, Math.min(step, img.virtualSize - p)), p);
  return out;
}

async function expectReadsLikeQemu(file: string, dir: string): Promise<void> {
  const img = await openImage(file);
  try {
    const theirs = JSON.parse(ok('qemu-img', ['map', '--output=json', file]));
    expect(mapAsQemuJson(await img.map())).toEqual(theirs);
    expect(firstDiff(await readAll(img), qemuRaw(file, dir))).toBe('equal');
  } finally {
    await img.close();
  }
}

function expectQemuCheckClean(file: string): void {
  const { status, json } = qemuCheckJson(file);
  expect({ status, corruptions: json.corruptions ?? 0, leaks: json.leaks ?? 0, errors: json['check-errors'] ?? 0 })
    .toEqual({ status: 0, corruptions: 0, leaks: 0, errors: 0 });
}

/** zstd clusters as qemu-img writes them, in the smallest, the default and the largest cluster size. */
const ZSTD_OPTIONS = [['-o', 'compression_type=zstd,cluster_size=512'], ['-o', 'compression_type=zstd'], ['-o', 'compression_type=zstd,cluster_size=2M']];

const flavours: { name: string; opts: string[]; ours: CreateOptions; cs: number }[] = [
  { name: 'v2 (compat=0.10)', opts: ['-o', 'compat=0.10'], ours: { compat: '0.10' }, cs: 65536 },
  { name: 'v3 default', opts: [], ours: {}, cs: 65536 },
  { name: 'cluster_size=512', opts: ['-o', 'cluster_size=512'], ours: { clusterSize: 512 }, cs: 512 },
  { name: 'cluster_size=4k', opts: ['-o', 'cluster_size=4096'], ours: { clusterSize: 4096 }, cs: 4096 },
  { name: 'cluster_size=2M', opts: ['-o', 'cluster_size=2M'], ours: { clusterSize: 2 << 20 }, cs: 2 << 20 },
  { name: 'refcount_bits=1', opts: ['-o', 'refcount_bits=1'], ours: { refcountBits: 1 }, cs: 65536 },
  { name: 'refcount_bits=16', opts: ['-o', 'refcount_bits=16'], ours: { refcountBits: 16 }, cs: 65536 },
  { name: 'refcount_bits=64', opts: ['-o', 'refcount_bits=64'], ours: { refcountBits: 64 }, cs: 65536 },
  { name: 'lazy_refcounts=on', opts: ['-o', 'lazy_refcounts=on'], ours: { lazyRefcounts: true }, cs: 65536 },
  { name: 'v2 with 512-byte clusters', opts: ['-o', 'compat=0.10,cluster_size=512'], ours: { compat: '0.10', clusterSize: 512 }, cs: 512 },
  { name: 'compression_type=zstd', opts: ['-o', 'compression_type=zstd'], ours: { compressionType: 'zstd' }, cs: 65536 },
];

describe.skipIf(!hasQemu)('qcow2 interop with qemu-img', () => {
  warnIfNoQemu('qcow2 interop');
  const t = tempDir('qcow2-interop-');
  afterAll(t.cleanup);

  for (const f of flavours) {
    const size = 32 * f.cs;
    const ops = scenario(f.cs, size);
    const slug = f.name.replace(/[^a-z0-9]+/gi, '_');

    it(`${f.name}: images qemu wrote are read right by us`, async () => {
      const file = join(t.dir, `${slug}-qemu.qcow2`);
      ok('qemu-img', ['create', '-f', 'qcow2', ...f.opts, file, String(size)]);
      const r = qemuIo(file, ops.map(qemuCmd));
      expect(r.status).toBe(0);
      await expectReadsLikeQemu(file, t.dir);
    });

    it(`${f.name}: images we wrote pass qemu-img check and read right through qemu`, async () => {
      const file = join(t.dir, `${slug}-ours.qcow2`);
      await createImage(file, { ...f.ours, size });
      const img = await openImage(file, { readOnly: false });
      await applyOurs(img, ops);
      const ourContent = await readAll(img);
      const ourCheck = await img.check();
      await img.close();
      expectQemuCheckClean(file);
      expect({ c: ourCheck.corruptions, l: ourCheck.leaks }).toEqual({ c: 0, l: 0 });
      expect(firstDiff(qemuRaw(file, t.dir), ourContent)).toBe('equal');
      // Spot checks through qemu-io's own pattern verification.
      const r = qemuIo(file, [`read -P 0x22 ${f.cs / 2} ${f.cs}`, `read -P 0x33 ${8 * f.cs} ${f.cs}`, `read -P 0 ${2 * f.cs} ${f.cs}`,
        `read -P 0x44 ${size - 2 * f.cs + 5} ${2 * f.cs - 5}`, `read -P 0x55 ${20 * f.cs + 1} 1`]);
      expect(r.stdout + r.stderr).not.toContain('verification failed');
      expect(r.status).toBe(0);
      // Our map of our image is what qemu-img map says of it.
      const again = await openImage(file);
      expect(mapAsQemuJson(await again.map())).toEqual(JSON.parse(ok('qemu-img', ['map', '--output=json', file])));
      await again.close();
    });
  }

  it('compressed images (qemu-img convert -c) are read right', async () => {
    const raw = join(t.dir, 'src.raw');
    ok('qemu-img', ['create', '-f', 'raw', raw, '4M']);
    expect(qemuIo(raw, ['write -P 0x61 0 1M', 'write -P 0x62 1536k 100k', 'write -P 0x63 3M 1M'], 'raw').status).toBe(0);
    // Text-like data (words from a fixed seed): clusters that compress into real entropy-coded
    // blocks of varied lengths, packed at odd byte offsets — not only runs of one byte.
    const words = ['qcow2', 'cluster', 'refcount', 'backing', 'snapshot', 'zstd', 'deflate', 'offload', 'volume', 'layer', '\n'];
    let seed = 7;
    const text = Buffer.from(Array.from({ length: 200_000 }, () => words[(seed = (seed * 1103515245 + 12345) & 0x7fffffff) % words.length]).join(' ').slice(0, 1 << 20));
    const fd = openSync(raw, 'r+');
    writeSync(fd, text, 0, text.length, 2 << 20);
    closeSync(fd);
    for (const opts of [[], ['-o', 'cluster_size=4096'], ['-o', 'compat=0.10'], ...ZSTD_OPTIONS]) {
      const c = join(t.dir, `compressed-${opts.join('')}.qcow2`.replace(/[=,]/g, '_'));
      ok('qemu-img', ['convert', '-c', '-O', 'qcow2', ...opts, raw, c]);
      if (opts.join().includes('zstd')) expect(ok('qemu-img', ['info', c])).toContain('compression type: zstd');
      await expectReadsLikeQemu(c, t.dir);
    }
  });

  it('a 3-deep chain with a raw base, made by qemu, is read right by us', async () => {
    const base = join(t.dir, 'chain-base.raw');
    ok('qemu-img', ['create', '-f', 'raw', base, '2M']);
    expect(qemuIo(base, ['write -P 1 0 1M', 'write -P 9 1900k 100k'], 'raw').status).toBe(0);
    ok('qemu-img', ['create', '-f', 'qcow2', '-b', 'chain-base.raw', '-F', 'raw', join(t.dir, 'chain-mid.qcow2'), '3M']);
    expect(qemuIo(join(t.dir, 'chain-mid.qcow2'), ['write -P 2 64k 64k', 'write -z 128k 64k', 'write -P 5 2M 100k']).status).toBe(0);
    const top = join(t.dir, 'chain-top.qcow2');
    ok('qemu-img', ['create', '-f', 'qcow2', '-b', 'chain-mid.qcow2', '-F', 'qcow2', top, '4M']);
    expect(qemuIo(top, ['write -P 3 192k 64k', 'discard 64k 64k', 'write -P 4 10000 300']).status).toBe(0);
    await expectReadsLikeQemu(top, t.dir);
    const img = await openImage(top);
    expect(img.chain.map((c) => c.format)).toEqual(['qcow2', 'qcow2', 'raw']);
    expect(img.chain[0]!.backingFilename).toBe('chain-mid.qcow2');
    await img.close();
  });

  it('a 3-deep chain we make and write reads right through qemu', async () => {
    const base = join(t.dir, 'our-base.raw');
    await createImage(base, { format: 'raw', size: 2 << 20 });
    const b = await openImage(base, { readOnly: false });
    await b.write(0, new Uint8Array(1 << 20).fill(1));
    await b.close();
    await createImage(join(t.dir, 'our-mid.qcow2'), { backingFile: 'our-base.raw', backingFormat: 'raw', size: 3 << 20 });
    const m = await openImage(join(t.dir, 'our-mid.qcow2'), { readOnly: false });
    await m.write(65536 + 100, new Uint8Array(1000).fill(2));
    await m.writeZeroes(131072, 65536);
    await m.close();
    const top = join(t.dir, 'our-top.qcow2');
    await createImage(top, { backingFile: 'our-mid.qcow2' });
    const img = await openImage(top, { readOnly: false });
    expect(img.virtualSize).toBe(3 << 20);
    await img.write(5000, new Uint8Array(50000).fill(3));
    await img.discard(196608, 65536);
    const content = await readAll(img);
    await img.close();
    expectQemuCheckClean(top);
    expect(firstDiff(qemuRaw(top, t.dir), content)).toBe('equal');
    expect(content[100]).toBe(1);
    expect(content[65536 + 100 + 999]).toBe(2);
    expect(content[131072 + 5]).toBe(0);
    expect(content[5000 + 49999]).toBe(3);
    expect(content[196608 + 1]).toBe(0);
    const r = run('qemu-img', ['info', '--backing-chain', top]);
    expect(r.stdout).toContain('our-base.raw');
  });
});
