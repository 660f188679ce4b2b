/**
 * qcow2 images with compression_type=zstd, next to qemu-img 7.2: images it compressed read right
 * here (every command on them), images compressed here check clean and read right there, a write
 * into a compressed cluster keeps the rest of it, and a damaged zstd cluster is a typed error.
 */
import { spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runImg } from './img-cli.js';
import { HAVE_QEMU, run } from './img-qemu.js';

const ROOT = join(import.meta.dirname, '../..');
const M = 1 << 20;

describe.skipIf(!HAVE_QEMU)('qcow2 zstd compression next to qemu-img', () => {
  let dir: string;
  const sh = (cmd: string, ...args: string[]) => {
    const r = run(cmd, args, dir);
    expect(r.status, `${cmd} ${args.join(' ')}: ${r.stderr}`).toBe(0);
    return r.stdout;
  };
  const checkClean = (file: string) => expect(sh('qemu-img', 'check', file)).toMatch(/No errors were found/);
  const identical = (a: string, b: string) => expect(run('qemu-img', ['compare', a, b], dir).stdout).toMatch(/Images are identical/);
  const compressedShare = (file: string) => Number(/([\d.]+)% compressed clusters/.exec(sh('qemu-img', 'check', file))?.[1] ?? 'NaN');

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'img-zstd-'));
    // src.raw (4 MiB): text-like words (entropy-coded zstd blocks of varied lengths), a pattern
    // (one-byte runs), random bytes (zstd does not shrink them: written as normal clusters), zeros.
    const words = ['qcow2', 'cluster', 'refcount', 'backing', 'snapshot', 'zstd', 'frame', 'offload', 'volume', '\n'];
    let seed = 11;
    const text = Buffer.from(Array.from({ length: 300_000 }, () => words[(seed = (seed * 1103515245 + 12345) & 0x7fffffff) % words.length]).join(' ').slice(0, 3 * M / 2));
    const noise = Buffer.alloc(256 * 1024);
    for (let i = 0; i < noise.length; i++) noise[i] = (seed = (seed * 1103515245 + 12345) & 0x7fffffff) >> 16;
    const raw = Buffer.alloc(4 * M);
    text.copy(raw, 0);
    raw.fill(0x5a, 2 * M, 2 * M + 300_000);
    noise.copy(raw, 3 * M);
    writeFileSync(join(dir, 'src.raw'), raw);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  for (const cs of ['512', '64k', '2M']) {
    it(`cluster_size=${cs}: an image qemu-img compressed with zstd reads right through every command`, async () => {
      const q = `q-${cs}.qcow2`;
      sh('qemu-img', 'convert', '-c', '-O', 'qcow2', '-o', `compression_type=zstd,cluster_size=${cs}`, 'src.raw', q);
      expect(compressedShare(q)).toBeGreaterThan(0);
      // info (JSON as qemu-img's), check, compare, map, convert out (raw, zlib-compressed, plain qcow2).
      const info = JSON.parse((await runImg(['info', '--output=json', q], dir)).stdout) as { 'format-specific': { data: Record<string, unknown> } };
      expect(info['format-specific'].data['compression-type']).toBe('zstd');
      expect(info).toEqual(JSON.parse(sh('qemu-img', 'info', '--output=json', q)));
      const check = await runImg(['check', q], dir);
      expect(check.status, check.stderr).toBe(0);
      expect(check.stdout).toContain('No errors were found');
      expect((await runImg(['compare', 'src.raw', q], dir)).stdout).toMatch(/Images are identical/);
      expect((await runImg(['map', '--output=json', q], dir)).stdout.replace(/\s+/g, '')).toBe(sh('qemu-img', 'map', '--output=json', q).replace(/\s+/g, ''));
      for (const [args, out] of [[['-O', 'raw'], `o-${cs}.raw`], [['-c', '-O', 'qcow2'], `o-${cs}-zlib.qcow2`], [['-O', 'qcow2'], `o-${cs}-plain.qcow2`]] as const) {
        const r = await runImg(['convert', ...args, q, out], dir);
        expect(r.status, r.stderr).toBe(0);
        if (out.endsWith('.raw')) expect(readFileSync(join(dir, out)).equals(readFileSync(join(dir, 'src.raw')))).toBe(true);
        else checkClean(out);
        identical('src.raw', out);
      }
      expect(sh('qemu-img', 'info', `o-${cs}-zlib.qcow2`)).toContain('compression type: zlib');
      // As the backing file of an overlay: read through the chain, and a write into the overlay over a compressed cluster.
      sh('qemu-img', 'create', '-f', 'qcow2', '-b', q, '-F', 'qcow2', `top-${cs}.qcow2`);
      expect((await runImg(['io', '-c', 'write -P 0x42 4096 512', `top-${cs}.qcow2`], dir)).status).toBe(0);
      sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x42 4096 512', `o-${cs}.raw`);
      expect((await runImg(['compare', `o-${cs}.raw`, `top-${cs}.qcow2`], dir)).stdout).toMatch(/Images are identical/);
      identical(`o-${cs}.raw`, `top-${cs}.qcow2`);
    });

    it(`cluster_size=${cs}: convert -c -o compression_type=zstd here: qemu-img checks it clean and reads it right`, async () => {
      const o = `o-${cs}-zstd.qcow2`;
      const r = await runImg(['convert', '-c', '-O', 'qcow2', '-o', `compression_type=zstd,cluster_size=${cs}`, 'src.raw', o], dir);
      expect(r.status, r.stderr).toBe(0);
      expect(sh('qemu-img', 'info', o)).toContain('compression type: zstd');
      checkClean(o);
      identical('src.raw', o);
      // As qemu-img compresses the same clusters (the random ones stay normal clusters).
      sh('qemu-img', 'convert', '-c', '-O', 'qcow2', '-o', `compression_type=zstd,cluster_size=${cs}`, 'src.raw', `q2-${cs}.qcow2`);
      expect(compressedShare(o)).toBe(compressedShare(`q2-${cs}.qcow2`));
      // And from a zlib-compressed image to zstd, through the zlib one.
      sh('qemu-img', 'convert', '-c', '-O', 'qcow2', 'src.raw', `q-${cs}-zlib.qcow2`);
      expect((await runImg(['convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', `q-${cs}-zlib.qcow2`, `o-${cs}-rezstd.qcow2`], dir)).status).toBe(0);
      checkClean(`o-${cs}-rezstd.qcow2`);
      identical('src.raw', `o-${cs}-rezstd.qcow2`);
    });
  }

  it('writes into compressed clusters of a zstd image (here): the rest of each cluster is kept, qemu-img checks it clean', async () => {
    sh('qemu-img', 'convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', 'src.raw', 'w.qcow2');
    sh('cp', 'src.raw', 'w.raw');
    const writes = ['write -P 0x99 1000 100', 'write -P 0x98 65000 2000', 'write -z 2097152 4096', 'write -P 0x97 2200000 70000'];
    const r = await runImg(['io', ...writes.flatMap((c) => ['-c', c]), 'w.qcow2'], dir);
    expect(r.status, r.stderr).toBe(0);
    sh('qemu-io', '-f', 'raw', ...writes.flatMap((c) => ['-c', c]), 'w.raw');
    checkClean('w.qcow2');
    identical('w.raw', 'w.qcow2');
    expect(sh('qemu-img', 'info', 'w.qcow2')).toContain('compression type: zstd');
  });

  it('refused as qemu-img refuses them: zstd in a v2 image, an unknown compression type', async () => {
    for (const opts of ['compat=0.10,compression_type=zstd', 'compression_type=lz4']) {
      expect(run('qemu-img', ['create', '-f', 'qcow2', '-o', opts, 'q-bad.qcow2', '1M'], dir).status).toBe(1);
      const o = await runImg(['create', '-f', 'qcow2', '-o', opts, 'o-bad.qcow2', '1M'], dir);
      expect(o.status).toBe(1);
      expect(o.stderr).toMatch(opts.includes('lz4') ? /InvalidArgument: Parameter 'compression-type' does not accept value 'lz4'/ : /InvalidArgument: .*zstd requires compat=1\.1/);
    }
  });

  it('a damaged zstd cluster is Corrupt, naming the image; the clusters around it still read', async () => {
    sh('qemu-img', 'convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', 'src.raw', 'd.qcow2');
    // The first frame in the file is the first cluster's (guest offset 0): break inside it.
    const bytes = readFileSync(join(dir, 'd.qcow2'));
    const frame = bytes.indexOf(Buffer.from([0x28, 0xb5, 0x2f, 0xfd]));
    expect(frame).toBeGreaterThan(0);
    const fd = openSync(join(dir, 'd.qcow2'), 'r+');
    writeSync(fd, Buffer.alloc(64, 0xee), 0, 64, frame + 40);
    closeSync(fd);
    const broken = await runImg(['convert', '-O', 'raw', 'd.qcow2', 'd.raw'], dir);
    expect(broken.status).toBe(1);
    expect(broken.stderr).toMatch(/offload: Corrupt: .*d\.qcow2: zstd cluster data (does not decode|is damaged)/);
    // qemu-img fails on it too; compare says "cannot read" (4) as qemu-img does, not "different" (1).
    expect(run('qemu-img', ['convert', '-O', 'raw', 'd.qcow2', 'q-d.raw'], dir).status).toBe(1);
    expect(run('qemu-img', ['compare', 'src.raw', 'd.qcow2'], dir).status).toBe(4);
    const cmp = await runImg(['compare', 'src.raw', 'd.qcow2'], dir);
    expect(cmp.status).toBe(4);
    expect(cmp.stderr).toMatch(/Corrupt: .*d\.qcow2: zstd cluster data/);
    // Its magic gone: Corrupt too (not a hang or a crash).
    writeFileSync(join(dir, 'd2.qcow2'), bytes);
    const fd2 = openSync(join(dir, 'd2.qcow2'), 'r+');
    writeSync(fd2, Buffer.alloc(4), 0, 4, frame);
    closeSync(fd2);
    expect((await runImg(['convert', '-O', 'raw', 'd2.qcow2', 'd2.raw'], dir)).stderr).toMatch(/Corrupt: .*no frame magic/);
    // The next cluster reads (qemu-io through our engine: `offload img io`).
    const next = await runImg(['io', '-c', 'read 65536 65536', 'd.qcow2'], dir);
    expect(next.status, next.stderr).toBe(0);
  });

  it('the installed CLI (bin/offload, its bundle) loads the zstd codec', () => {
    const r = spawnSync(join(ROOT, 'bin/offload'), ['img', 'convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', 'src.raw', 'bin.qcow2'], { cwd: dir, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    checkClean('bin.qcow2');
    identical('src.raw', 'bin.qcow2');
    const back = spawnSync(join(ROOT, 'bin/offload'), ['img', 'compare', 'src.raw', 'bin.qcow2'], { cwd: dir, encoding: 'utf8' });
    expect(back.stdout).toMatch(/Images are identical/);
  });
});
