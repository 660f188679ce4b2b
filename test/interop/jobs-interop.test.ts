/**
 * Chain jobs against qemu-img on chains qemu-img/qemu-io built: our stream/commit/rebase must
 * give images `qemu-img compare`-identical to what `qemu-img rebase`/`commit` give on copies
 * of the same chain, with `qemu-img check` clean.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { openImage } from '../../plugins/qcow2/index.js';
import { makeEmpty, runCommit, runRebase, runStream } from '../../plugins/qcow2/jobs/index.js';
import { HAVE_QEMU, backingOf, check, compare, copyDir, qimg, qio, runJob, tempDir } from './jobs-support.js';

interface Chain {
  name: string;
  /** Files top first; the top is always top.qcow2. */
  files: string[];
  build(dir: string): void;
}

const M = 1 << 20;

const chains: Chain[] = [
  {
    name: '2 deep, qcow2 base',
    files: ['top.qcow2', 'base.qcow2'],
    build(dir) {
      qimg(dir, 'create', '-f', 'qcow2', 'base.qcow2', '8M');
      qio(dir, 'base.qcow2', ['write -P 1 0 3M', 'write -P 7 5M 512k', 'write -z 6M 1M']);
      qimg(dir, 'create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2');
      qio(dir, 'top.qcow2', ['write -P 2 1M 100k', 'write -z 2M 128k', 'discard 5M 64k', 'write -P 3 7M 4k']);
    },
  },
  {
    name: '3 deep, qcow2 base, mixed cluster sizes, top larger than its base',
    files: ['top.qcow2', 'mid.qcow2', 'base.qcow2'],
    build(dir) {
      qimg(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', 'base.qcow2', '6M');
      qio(dir, 'base.qcow2', ['write -P 1 0 4M', 'write -P 9 5M 1M']);
      qimg(dir, 'create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2', '8M');
      qio(dir, 'mid.qcow2', ['write -P 2 1M 1M', 'write -z 2M 64k', 'discard 3M 128k', 'write -P 4 6M 300k']);
      qimg(dir, 'create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', '12M');
      qio(dir, 'top.qcow2', ['write -P 3 1536k 64k', 'write -P 5 9M 1M', 'write -z 0 64k', 'write -P 6 5900k 8k']);
    },
  },
  {
    name: '3 deep, raw base, v2 middle',
    files: ['top.qcow2', 'mid.qcow2', 'base.raw'],
    build(dir) {
      qimg(dir, 'create', '-f', 'raw', 'base.raw', '8M');
      qio(dir, 'base.raw', ['write -P 1 0 2M', 'write -P 8 4M 64k'], 'raw');
      qimg(dir, 'create', '-f', 'qcow2', '-o', 'compat=0.10', '-b', 'base.raw', '-F', 'raw', 'mid.qcow2');
      qio(dir, 'mid.qcow2', ['write -P 2 512k 1M', 'write -z 4M 64k']);
      qimg(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=128k', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2');
      qio(dir, 'top.qcow2', ['write -P 3 100k 200k', 'write -z 1M 256k', 'discard 6M 256k']);
    },
  },
];

const dirs: (() => void)[] = [];
afterAll(() => dirs.forEach((c) => c()));

function fresh(chain: Chain): string {
  const t = tempDir();
  dirs.push(t.cleanup);
  chain.build(t.dir);
  return t.dir;
}

function copyOf(dir: string): string {
  const t = tempDir();
  dirs.push(t.cleanup);
  copyDir(dir, t.dir);
  return t.dir;
}

async function withTop(dir: string, fn: (img: Awaited<ReturnType<typeof openImage>>) => Promise<void>): Promise<void> {
  const img = await openImage(`${dir}/top.qcow2`, { readOnly: false });
  try {
    await fn(img);
  } finally {
    await img.close();
  }
}

function expectSame(ours: string, theirs: string, file: string): void {
  expect(compare(ours, file, `${theirs}/${file}`).stdout.trim(), `${file} vs qemu-img`).toBe('Images are identical.');
  if (file.endsWith('.qcow2')) expect(check(ours, file).status, `qemu-img check ${file}`).toBe(0);
}

describe.skipIf(!HAVE_QEMU).each(chains)('chain jobs vs qemu-img: $name', (chain) => {
  const base = chain.files[chain.files.length - 1]!;
  const fmt = base.endsWith('.raw') ? 'raw' : 'qcow2';

  it('stream (no base) = qemu-img rebase -b ""', async () => {
    const ref = fresh(chain);
    const ours = copyOf(ref);
    const before = copyOf(ref);
    await withTop(ours, (img) => runJob('stream', (ctx) => runStream(img, {}, ctx)));
    qimg(ref, 'rebase', '-b', '', 'top.qcow2');
    expectSame(ours, ref, 'top.qcow2');
    expect(backingOf(ours, 'top.qcow2')).toBe('');
    // Same content as the chain had before.
    expect(compare(ours, 'top.qcow2', `${before}/top.qcow2`).status).toBe(0);
  });

  it('stream to the base = qemu-img rebase -b BASE', async () => {
    const ref = fresh(chain);
    const ours = copyOf(ref);
    await withTop(ours, (img) => runJob('stream', (ctx) => runStream(img, { base }, ctx)));
    qimg(ref, 'rebase', '-b', base, '-F', fmt, 'top.qcow2');
    expectSame(ours, ref, 'top.qcow2');
    expect(backingOf(ours, 'top.qcow2')).toBe(base);
  });

  it('commit = qemu-img commit (base and emptied top)', async () => {
    const ref = fresh(chain);
    const ours = copyOf(ref);
    await withTop(ours, async (img) => {
      await runJob('commit', (ctx) => runCommit(img, {}, ctx));
      await makeEmpty(img);
    });
    qimg(ref, 'commit', 'top.qcow2');
    expectSame(ours, ref, 'top.qcow2');
    expectSame(ours, ref, chain.files[1]!);
  });

  it('commit -b BASE = qemu-img commit -b BASE', async () => {
    const ref = fresh(chain);
    const ours = copyOf(ref);
    await withTop(ours, (img) => runJob('commit', (ctx) => runCommit(img, { base }, ctx)));
    qimg(ref, 'commit', '-b', base, 'top.qcow2');
    expectSame(ours, ref, base);
    expectSame(ours, ref, 'top.qcow2');
  });

  it('safe rebase onto the base = qemu-img rebase -b BASE; unsafe = header only', async () => {
    const ref = fresh(chain);
    const ours = copyOf(ref);
    await withTop(ours, (img) => runJob('rebase', (ctx) => runRebase(img, { backing: base, backingFormat: fmt }, ctx)));
    qimg(ref, 'rebase', '-b', base, '-F', fmt, 'top.qcow2');
    expectSame(ours, ref, 'top.qcow2');

    const unsafeOurs = copyOf(fresh(chain));
    const unsafeRef = copyOf(unsafeOurs);
    await withTop(unsafeOurs, (img) => runJob('rebase', (ctx) => runRebase(img, { backing: base, backingFormat: fmt, unsafe: true }, ctx)));
    qimg(unsafeRef, 'rebase', '-u', '-b', base, '-F', fmt, 'top.qcow2');
    expectSame(unsafeOurs, unsafeRef, 'top.qcow2');
    expect(backingOf(unsafeOurs, 'top.qcow2')).toBe(base);
  });

  it.skipIf(chain.files.length < 3)('intermediate commit re-points the top at the base', async () => {
    const ref = fresh(chain);
    const ours = copyOf(ref);
    const before = copyOf(ref);
    await withTop(ours, async (img) => {
      await runJob('commit', (ctx) => runCommit(img, { top: 'mid.qcow2' }, ctx));
      expect(img.chain.map((c) => c.filename.split('/').pop())).toEqual(['top.qcow2', base]);
      // The open image reads through its new chain.
      const again = await openImage(`${before}/top.qcow2`);
      try {
        for (let off = 0; off < img.virtualSize; off += M) {
          const n = Math.min(M, img.virtualSize - off);
          expect(Buffer.from(await img.read(off, n)).equals(Buffer.from(await again.read(off, n)))).toBe(true);
        }
      } finally {
        await again.close();
      }
    });
    qimg(ref, 'commit', 'mid.qcow2');
    qimg(ref, 'rebase', '-u', '-b', base, '-F', fmt, 'top.qcow2');
    expectSame(ours, ref, 'top.qcow2');
    expectSame(ours, ref, base);
    expect(backingOf(ours, 'top.qcow2')).toBe(base);
    expect(compare(ours, 'top.qcow2', `${before}/top.qcow2`).status).toBe(0);
  });
});
