/**
 * The image copy behind `convert`: the native helper's copyRanges on its own (in place with zero
 * blocks left out, sequential allocation, errors), and copyImageContent both ways (native and
 * through the engine) over a source that mixes every kind of range, checked against each other,
 * against the source and with qemu-img.
 */
import { closeSync, openSync, ftruncateSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { createImage, openImage, type Image } from '../index.js';
import { hasQemu, ok, pattern, qemuIo, run, tempDir, warnIfNoQemu } from './helpers.js';
import { copyImageContent } from '../engine/copy-image.js';
import { ImageHandle } from '../engine/image-handle.js';
import { nativeCopyAvailable, setNativeCopyEnabled } from '../engine/file.js';
import { nativeAddon } from '../engine/native-addon.js';
import { dataExtents } from '../engine/seek-data.js';

const K = 1024;
const M = 1024 * K;
const native = nativeCopyAvailable();
if (!native) console.warn('SKIPPED native copy tests: native/fileio is not built (npm run build:native)');
warnIfNoQemu('copyImageContent against qemu-img');

const { dir, cleanup } = tempDir('copy-image-');
afterAll(cleanup);
afterEach(() => setNativeCopyEnabled(true));

/** A file with `data` at offset 0, opened for reading; and a new empty target of `size` bytes. */
function files(name: string, data: Uint8Array, size: number): { src: number; dst: number; dstPath: string; close: () => void } {
  const srcPath = join(dir, `${name}.src`);
  const dstPath = join(dir, `${name}.dst`);
  writeFileSync(srcPath, data);
  const src = openSync(srcPath, 'r');
  const dst = openSync(dstPath, 'w+');
  ftruncateSync(dst, size);
  return { src, dst, dstPath, close: () => { closeSync(src); closeSync(dst); } };
}

describe.skipIf(!native)('native copyRanges', () => {
  const copy = (...a: Parameters<NonNullable<ReturnType<typeof nativeAddon>>['copyRanges']>) => nativeAddon()!.copyRanges(...a);

  it('copies ranges in place, longer than a buffer and unaligned, and leaves zero blocks unwritten', async () => {
    const data = pattern(6 * M, 7);
    data.fill(0, 1 * M, 1 * M + 8 * K); // two zero blocks at the start of a piece
    data.fill(0, 3 * M + 4 * K, 3 * M + 12 * K); // and two inside one
    const f = files('inplace', data, 16 * M);
    try {
      // [src, dst, length]: 2.5 MiB (three pieces), an odd-sized range, one that ends in a short block.
      const ops = [0, 8 * M, 2.5 * M + 4 * K, 3 * M, 100, 3 * M - 4 * K, 5 * M, 12 * M + 7, 1000];
      expect(Array.from(await copy(f.src, f.dst, Float64Array.from(ops), { block: 4 * K }))).toEqual([]);
      const out = readFileSync(f.dstPath);
      for (let i = 0; i < ops.length; i += 3) {
        const [s, d, n] = [ops[i]!, ops[i + 1]!, ops[i + 2]!];
        expect(Buffer.compare(out.subarray(d, d + n), Buffer.from(data.subarray(s, s + n)))).toBe(0);
      }
      expect(out.subarray(3 * M, 8 * M).every((b) => b === 0)).toBe(true);
      // Zero blocks are holes: counted from each range's start (8 MiB + 1 MiB, and 100 + 4 KiB on).
      const fd = openSync(f.dstPath, 'r');
      try {
        const ext = dataExtents(fd, 0, 16 * M)!;
        const isHole = (a: number, b: number) => ext.every(([x, y]) => y <= a || x >= b);
        expect(isHole(9 * M, 9 * M + 8 * K)).toBe(true);
        expect(isHole(9 * M + 8 * K, 9 * M + 12 * K)).toBe(false);
      } finally {
        closeSync(fd);
      }
    } finally {
      f.close();
    }
  });

  it('with block 0 writes every byte, zeros too', async () => {
    const f = files('all', new Uint8Array(64 * K), 64 * K);
    try {
      await copy(f.src, f.dst, Float64Array.from([0, 0, 64 * K]), { block: 0 });
      expect(dataExtents(f.dst, 0, 64 * K)).toEqual([[0, 64 * K]]);
    } finally {
      f.close();
    }
  });

  it('allocates sequentially: non-zero blocks go to the next host offsets, a short last block is padded', async () => {
    const cs = 64 * K;
    const data = pattern(4 * cs + 100, 3);
    data.fill(0, cs, 2 * cs); // the second cluster is all zero: skipped
    const f = files('alloc', data, 0);
    try {
      const base = 5 * cs;
      // Guest offsets 10 and 20 clusters; the second op is 1 cluster + 100 bytes (ends at the virtual size).
      const entries = new Uint8Array(5 * 8).fill(0xee); // 3 + 2 blocks; every byte is written
      const pairs = await copy(f.src, f.dst, Float64Array.from([0, 10 * cs, 3 * cs, 3 * cs, 20 * cs, cs + 100]),
        { block: cs, alloc: base, entries, entryHigh: 0x8000_0000 });
      expect(Array.from(pairs)).toEqual([10 * cs, base, 12 * cs, base + cs, 20 * cs, base + 2 * cs, 21 * cs, base + 3 * cs]);
      // Big-endian, high bits OR'd in, 0 for the zero block left out.
      const dv = new DataView(entries.buffer);
      const entry = (k: number) => dv.getBigUint64(k * 8);
      expect([0, 1, 2, 3, 4].map(entry)).toEqual([base, 0, base + cs, base + 2 * cs, base + 3 * cs].map((h) => (h === 0 ? 0n : BigInt(h) | (1n << 63n))));
      const out = readFileSync(f.dstPath);
      expect(out.length).toBe(base + 4 * cs);
      expect(Buffer.compare(out.subarray(base, base + cs), Buffer.from(data.subarray(0, cs)))).toBe(0);
      expect(Buffer.compare(out.subarray(base + cs, base + 3 * cs), Buffer.from(data.subarray(2 * cs, 4 * cs)))).toBe(0);
      expect(Buffer.compare(out.subarray(base + 3 * cs, base + 3 * cs + 100), Buffer.from(data.subarray(4 * cs)))).toBe(0);
      expect(out.subarray(base + 3 * cs + 100).every((b) => b === 0)).toBe(true);
    } finally {
      f.close();
    }
  });

  it('reads past the end of the source as zeros', async () => {
    const f = files('short', pattern(4 * K, 9), 64 * K);
    try {
      await copy(f.src, f.dst, Float64Array.from([0, 0, 12 * K]), { block: 0 });
      const out = readFileSync(f.dstPath);
      expect(Buffer.compare(out.subarray(0, 4 * K), Buffer.from(pattern(4 * K, 9)))).toBe(0);
      expect(out.subarray(4 * K, 12 * K).every((b) => b === 0)).toBe(true);
    } finally {
      f.close();
    }
  });

  it('rejects bad arguments with a TypeError (code EINVAL), before any I/O', () => {
    const bad: [unknown[], RegExp][] = [
      [[0, 1, [0, 0, 1], { block: 0 }], /Float64Array/],
      [[0, 1, new Float64Array(2), { block: 0 }], /triples/],
      [[0, 1, Float64Array.from([0, -1, 1]), { block: 0 }], /non-negative/],
      [[0, 1, Float64Array.from([0, 0, 0]), { block: 0 }], /length > 0/],
      [[0, 1, Float64Array.from([0.5, 0, 1]), { block: 0 }], /whole/],
      [[0, 1, Float64Array.from([0, 0, 1]), { block: 3000 }], /power of two/],
      [[0, 1, Float64Array.from([0, 0, 1]), { block: 4 * M }], /power of two/],
      [[0, 1, Float64Array.from([0, 0, 1]), { block: 0, alloc: 0 }], /needs opts.block/],
      [[0, 1, Float64Array.from([0, 0, 1]), { block: 512, entries: new Uint8Array(8) }], /entries needs opts.alloc/],
      [[0, 1, Float64Array.from([0, 0, 1024]), { block: 512, alloc: 0, entries: new Uint8Array(8) }], /8 bytes per block/],
      [[0, 1, Float64Array.from([0, 0, 512]), { block: 512, alloc: 0, entries: new Uint16Array(4) }], /Uint8Array/],
      [[0, 1, Float64Array.from([0, 0, 512]), { block: 512, alloc: 0, entries: new Uint8Array(8), entryHigh: 2 ** 32 }], /entryHigh/],
      [[-1, 1, Float64Array.from([0, 0, 1]), { block: 0 }], /file descriptors/],
      [[0, 1, Float64Array.from([0, 0, 1])], /four arguments/],
    ];
    for (const [args, msg] of bad) {
      let err: (Error & { code?: string }) | undefined;
      try {
        (nativeAddon()!.copyRanges as (...a: unknown[]) => unknown)(...args);
      } catch (e) {
        err = e as Error & { code?: string };
      }
      expect(err, String(msg)).toBeInstanceOf(TypeError);
      expect(err!.code).toBe('EINVAL');
      expect(err!.message).toMatch(msg);
    }
  });

  it('an I/O error rejects with the errno name: a target opened read-only is EBADF', async () => {
    const f = files('ebadf', pattern(8 * K, 1), 8 * K);
    const ro = openSync(f.dstPath, 'r');
    try {
      await expect(copy(f.src, ro, Float64Array.from([0, 0, 8 * K]), { block: 0 })).rejects.toMatchObject({ code: 'EBADF', message: /^write: / });
      await expect(copy(ro, ro, Float64Array.from([0, 0, 8 * K]), { block: 0 }).then(() => 'ok')).rejects.toMatchObject({ code: 'EBADF' });
    } finally {
      closeSync(ro);
      f.close();
    }
  });
});

/**
 * A 3-deep chain whose top (4 KiB clusters) mixes every kind of range: data with zero blocks
 * inside, compressed clusters, zero clusters over backing data, data from a qcow2 middle layer
 * and from a raw base, and a virtual size that ends inside a cluster.
 */
function mixedChain(): string {
  const size = 9 * M + 512;
  const base = join(dir, 'base.raw');
  const mid = join(dir, 'mid.qcow2');
  const top = join(dir, 'top.qcow2');
  ok('qemu-img', ['create', '-q', '-f', 'raw', base, String(size)]);
  expect(qemuIo(base, ['write -P 1 0 2M', 'write -P 2 8M 1M', 'write -P 3 9M 512'], 'raw').status).toBe(0);
  ok('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k', '-b', base, '-F', 'raw', mid]);
  expect(qemuIo(mid, ['write -P 4 1M 1M', 'write -P 5 3M 96k']).status).toBe(0);
  ok('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', mid, '-F', 'qcow2', top]);
  expect(qemuIo(top, [
    'write -P 6 4M 1M', 'write -P 0 4M 8k', 'write -P 0 4600k 4k', // data with zero blocks in it
    'write -c -P 7 6M 64k', // compressed
    'write -z 1536k 256k', // zero clusters over the middle layer's data
    'write -P 8 5M 6k', // ends inside a 4 KiB cluster and inside a 64 KiB one
    'write -P 9 9M 512', // the last, partial cluster
  ]).status).toBe(0);
  return top;
}

/** `qemu-img map` without host offsets, adjacent entries of the same kind merged. */
function allocation(format: string, file: string): [number, number, boolean, boolean][] {
  const out: [number, number, boolean, boolean][] = [];
  for (const e of JSON.parse(ok('qemu-img', ['map', '--output=json', '-f', format, file])) as { start: number; length: number; zero: boolean; data: boolean }[]) {
    const last = out.at(-1);
    if (last && last[2] === e.zero && last[3] === e.data) last[1] += e.length;
    else out.push([e.start, e.length, e.zero, e.data]);
  }
  return out;
}

async function contentOf(img: Image): Promise<Uint8Array> {
  return img.read(0, img.virtualSize);
}

describe.skipIf(!hasQemu)('copyImageContent', () => {
  let top: string;
  let expected: Uint8Array;
  const source = async () => {
    top ??= mixedChain();
    const src = await openImage(top, { readOnly: true });
    expected ??= await contentOf(src);
    return src;
  };

  const cases: [string, 'raw' | 'qcow2', number][] = [['raw', 'raw', 0], ['qcow2 4k', 'qcow2', 4 * K], ['qcow2 64k', 'qcow2', 64 * K], ['qcow2 2M', 'qcow2', 2 * M]];
  it.each(cases)('into %s: the same image natively and through the engine, equal to the source, as qemu-img sees it', async (name, format, cs) => {
    const src = await source();
    const outs: string[] = [];
    try {
      for (const nativeOn of native ? [true, false] : [false]) {
        setNativeCopyEnabled(nativeOn);
        const out = join(dir, `out-${name.replace(' ', '-')}-${nativeOn ? 'native' : 'engine'}.${format}`);
        await createImage(out, format === 'raw' ? { format, size: src.virtualSize } : { format, size: src.virtualSize, clusterSize: cs });
        const dst = await openImage(out, { format, readOnly: false, noBacking: true, deferMetadata: true, cache: 'unsafe' });
        const seen: number[] = [];
        try {
          await copyImageContent(src, dst, { fresh: true }, { update: (c, t) => { expect(t).toBe(src.virtualSize); seen.push(c); } });
          await dst.flush();
          expect(Buffer.compare(Buffer.from(await contentOf(dst)), Buffer.from(expected))).toBe(0);
        } finally {
          await dst.close();
        }
        // Progress only goes up, and ends at the total.
        expect(seen.every((c, i) => i === 0 || c >= seen[i - 1]!)).toBe(true);
        expect(seen.at(-1)).toBe(src.virtualSize);
        expect(run('qemu-img', ['compare', '-q', top, out]).status).toBe(0);
        if (format === 'qcow2') expect(ok('qemu-img', ['check', '-q', out])).toBe('');
        outs.push(out);
      }
    } finally {
      await src.close();
    }
    if (outs.length === 2) {
      // Same allocation both ways: zero blocks (4 KiB) or zero clusters are left out by both.
      expect(allocation(format, outs[0]!)).toEqual(allocation(format, outs[1]!));
    }
    const data = JSON.parse(ok('qemu-img', ['map', '--output=json', '-f', format, outs[0]!])) as { start: number; length: number; data: boolean }[];
    const isData = (off: number) => data.some((e) => e.data && e.start <= off && off < e.start + e.length);
    expect(isData(4 * M + 8 * K)).toBe(true);
    if (cs <= 4 * K) {
      expect(isData(4 * M)).toBe(false); // the zero blocks written into the data stay holes
      expect(isData(4600 * K)).toBe(false);
    }
    if (cs <= 64 * K) expect(isData(1600 * K)).toBe(false); // zero clusters over backing data
  });

  it('a qcow2 target refuses a native copy into clusters it has already allocated', async () => {
    if (!native) return;
    const out = join(dir, 'taken.qcow2');
    await createImage(out, { format: 'qcow2', size: 4 * M });
    const dst = await openImage(out, { readOnly: false, noBacking: true });
    const srcFile = join(dir, 'taken.src');
    writeFileSync(srcFile, pattern(M, 2));
    const src = await openImage(srcFile, { format: 'raw', readOnly: true });
    try {
      await dst.write(64 * K, pattern(4 * K, 1));
      const node = ImageHandle.nodeOf(dst)!;
      const copyFromFile = node.copyFromFile!.bind(node);
      const file = ImageHandle.nodeOf(src)!.file;
      await expect(copyFromFile(file, Float64Array.from([0, 0, 128 * K]))).rejects.toThrow(/allocated clusters/);
      await expect(copyFromFile(file, Float64Array.from([0, 4 * K, 64 * K]))).rejects.toThrow(/whole clusters/);
      // Several ops in guest order (looked up at once) and out of order (one by one): refused
      // when any of them overlaps the allocated cluster, taken when it lies between them.
      await expect(copyFromFile(file, Float64Array.from([0, 0, 64 * K, 0, 64 * K, 64 * K]))).rejects.toThrow(/allocated clusters at 65536/);
      await expect(copyFromFile(file, Float64Array.from([0, 256 * K, 64 * K, 0, 0, 128 * K]))).rejects.toThrow(/allocated clusters at 65536/);
      await copyFromFile(file, Float64Array.from([0, 0, 64 * K, 64 * K, 128 * K, 64 * K]));
      expect(Buffer.compare(Buffer.from(await dst.read(128 * K, 64 * K)), Buffer.from(pattern(M, 2).subarray(64 * K, 128 * K)))).toBe(0);
      await copyFromFile(file, Float64Array.from([0, M, M]));
      expect(Buffer.compare(Buffer.from(await dst.read(M, M)), Buffer.from(pattern(M, 2)))).toBe(0);
      expect(Buffer.compare(Buffer.from(await dst.read(64 * K, 4 * K)), Buffer.from(pattern(4 * K, 1)))).toBe(0);
    } finally {
      await src.close();
      await dst.close();
    }
    expect(ok('qemu-img', ['check', '-q', out])).toBe('');
  });
});
