/**
 * `offload img create/resize/compare/snapshot/convert` and bad input: output and exit codes next
 * to qemu-img's for the same arguments, and typed one-line errors.
 */
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runImg } from './img-cli.js';
import { HAVE_QEMU, run } from './img-qemu.js';

describe.skipIf(!HAVE_QEMU)('offload img commands next to qemu-img', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'img-cmd-'));
    expect(run('qemu-img', ['create', '-f', 'qcow2', 'back.qcow2', '16M'], dir).status).toBe(0);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const creates: string[][] = [
    ['-f', 'qcow2', 'X', '64M'],
    ['-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4k', 'X', '1.5G'],
    ['-f', 'qcow2', '-o', 'lazy_refcounts=on', '-o', 'refcount_bits=1,cluster_size=512', 'X', '100G'],
    ['-f', 'qcow2', '-o', 'compat=v3,refcount_bits=64,cluster_size=2M', 'X', '3G'],
    ['-f', 'qcow2', '-b', 'back.qcow2', '-F', 'qcow2', 'X'],
    ['-f', 'qcow2', '-b', 'back.qcow2', '-F', 'qcow2', '-o', 'preallocation=off', 'X', '32M'],
    ['-f', 'raw', 'X', '1M'],
    ['X', '100k'],
  ];

  it.each(creates.map((c, i) => [i, c] as const))('create %i: same Formatting line and same file as qemu-img', async (i, args) => {
    const q = run('qemu-img', ['create', ...args.map((a) => (a === 'X' ? `q${i}.img` : a))], dir);
    const o = await runImg(['create', ...args.map((a) => (a === 'X' ? `o${i}.img` : a))], dir);
    expect(q.status, q.stderr).toBe(0);
    expect(o.status, o.stderr).toBe(0);
    expect(o.stdout.replace(`o${i}.img`, `q${i}.img`)).toBe(q.stdout);
    // qemu-img create's fresh layout, byte for byte.
    expect(readFileSync(join(dir, `o${i}.img`)).equals(readFileSync(join(dir, `q${i}.img`)))).toBe(true);
  });

  // Exit 1, as qemu-img: bad arguments and failed operations alike.
  const badCreates: [string[], RegExp, number][] = [
    [['-f', 'qcow2', '-o', 'compat=0.10,lazy_refcounts=on', 'bad.img', '1M'], /Lazy refcounts only supported with compatibility level 1.1/, 1],
    [['-f', 'qcow2', '-o', 'refcount_bits=3', 'bad.img', '1M'], /Refcount width must be a power of two/, 1],
    [['-f', 'qcow2', '-o', 'cluster_size=3000', 'bad.img', '1M'], /Cluster size must be a power of two between 512 and 2048k/, 1],
    [['-f', 'qcow2', '-o', 'cluster_size=4M', 'bad.img', '1M'], /Cluster size must be a power of two/, 1],
    [['-f', 'qcow2', '-o', 'foo=1', 'bad.img', '1M'], /Invalid parameter 'foo'/, 1],
    [['-f', 'qcow2', 'bad.img'], /needs a size parameter/, 1],
    [['-f', 'qcow2', 'bad.img', '1x'], /Invalid image size specified/, 1],
    [['-f', 'qcow2', '-o', 'cluster_size=512', 'bad.img', '129G'], /too large/, 1],
    [['-f', 'qcow2', '-b', 'back.qcow2', 'bad.img'], /Backing file specified without backing format/, 1],
    [['-f', 'qcow2', '-b', 'missing.qcow2', '-F', 'qcow2', 'bad.img', '1M'], /missing\.qcow2/, 1],
    [['-f', 'qcow2', '-o', 'extended_l2=on', 'bad.img', '1M'], /extended_l2=on is not supported/, 1],
    [['-f', 'vmdk', 'bad.img', '1M'], /Unknown file format 'vmdk'/, 1],
  ];

  it.each(badCreates.map((c, i) => [i, ...c] as const))('bad create %i: one line, typed exit code, nothing written', async (_i, args, msg, code) => {
    const o = await runImg(['create', ...args], dir);
    expect(o.status).toBe(code);
    expect(o.stderr).toMatch(msg);
    expect(o.stderr.trim().split('\n')).toHaveLength(1);
    expect(() => statSync(join(dir, 'bad.img'))).toThrow();
  });

  it('resize grows, refuses to shrink without --shrink, and matches qemu-img info afterwards', async () => {
    for (const p of ['q', 'o']) run('qemu-img', ['create', '-f', 'qcow2', `${p}-rs.qcow2`, '1M'], dir);
    expect(run('qemu-img', ['resize', 'q-rs.qcow2', '+3M'], dir).stdout).toBe('Image resized.\n');
    const o = await runImg(['resize', 'o-rs.qcow2', '+3M'], dir);
    expect(o).toMatchObject({ status: 0, stdout: 'Image resized.\n' });
    const qi = run('qemu-img', ['info', '--output=json', 'q-rs.qcow2'], dir).stdout;
    const oi = run('qemu-img', ['info', '--output=json', 'o-rs.qcow2'], dir).stdout;
    expect(oi.replace('o-rs', 'q-rs').replace(/"actual-size": \d+/, '')).toBe(qi.replace(/"actual-size": \d+/, ''));
    const shrink = await runImg(['resize', 'o-rs.qcow2', '1M'], dir);
    expect(shrink.status).toBe(1); // OutOfRange
    expect(shrink.stderr).toContain('Use the --shrink option to perform a shrink operation.');
    const shrunk = await runImg(['resize', '--shrink', 'o-rs.qcow2', '2M'], dir);
    expect(shrunk.status, shrunk.stderr).toBe(0);
    expect(run('qemu-img', ['check', 'o-rs.qcow2'], dir).status).toBe(0);
    expect(JSON.parse(run('qemu-img', ['info', '--output=json', 'o-rs.qcow2'], dir).stdout)['virtual-size']).toBe(2 * 1024 * 1024);
    const neg = await runImg(['resize', 'o-rs.qcow2', '--', '-10M'], dir);
    expect(neg.status).toBe(1); // InvalidArgument: qemu-img's 1
    expect(neg.stderr).toContain('New image size must be positive');
  });

  it('compare: identical, mismatch at qemu-img\'s offset, size mismatch, missing file', async () => {
    writeFileSync(join(dir, 'c1.raw'), Buffer.alloc(1 << 20));
    writeFileSync(join(dir, 'c2.raw'), Buffer.alloc(1 << 20));
    run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 1000 1', 'c2.raw'], dir);
    writeFileSync(join(dir, 'c3.raw'), Buffer.alloc(2 << 20));
    run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 1500000 1', 'c3.raw'], dir);
    run('qemu-img', ['convert', '-O', 'qcow2', 'c2.raw', 'c2.qcow2'], dir);
    for (const [a, b] of [['c1.raw', 'c1.raw'], ['c1.raw', 'c2.raw'], ['c1.raw', 'c3.raw'], ['c3.raw', 'c1.raw'], ['c2.raw', 'c2.qcow2'], ['c1.raw', 'c2.qcow2']]) {
      const q = run('qemu-img', ['compare', a!, b!], dir);
      const o = await runImg(['compare', a!, b!], dir);
      expect(o.stdout, `${a} ${b}`).toBe(q.stdout);
      expect(o.status).toBe(q.status);
    }
    const missing = await runImg(['compare', 'c1.raw', 'nope.raw'], dir);
    expect(missing.status).toBe(2);
  });

  it('snapshot: exactly one action; unknown snapshot is a typed error', async () => {
    run('qemu-img', ['create', '-f', 'qcow2', 'sn.qcow2', '1M'], dir);
    expect((await runImg(['snapshot', 'sn.qcow2'], dir)).status).toBe(1);
    expect((await runImg(['snapshot', '-l', '-c', 'x', 'sn.qcow2'], dir)).status).toBe(1);
    const a = await runImg(['snapshot', '-a', 'nope', 'sn.qcow2'], dir);
    expect(a.status).toBe(1);
    expect(a.stderr).toContain('nope');
    expect((await runImg(['snapshot', '-l', 'sn.qcow2'], dir)).stdout).toBe(run('qemu-img', ['snapshot', '-l', 'sn.qcow2'], dir).stdout);
  });

  it('convert -O qcow2 from raw: qemu-img check clean, compare identical, stays sparse', async () => {
    writeFileSync(join(dir, 'src.raw'), Buffer.alloc(8 << 20));
    run('qemu-io', ['-f', 'raw', '-c', 'write -P 9 1M 100k', '-c', 'write -P 8 7M 4k', 'src.raw'], dir);
    const o = await runImg(['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4k', 'src.raw', 'dst.qcow2'], dir);
    expect(o.status, o.stderr).toBe(0);
    expect(run('qemu-img', ['check', 'dst.qcow2'], dir).status).toBe(0);
    expect(run('qemu-img', ['compare', 'src.raw', 'dst.qcow2'], dir).stdout).toBe('Images are identical.\n');
    const info = JSON.parse(run('qemu-img', ['info', '--output=json', 'dst.qcow2'], dir).stdout);
    expect(info['cluster-size']).toBe(4096);
    // Only the written data is allocated: 100k + 4k of data plus metadata, far below 8 MiB.
    expect(statSync(join(dir, 'dst.qcow2')).size).toBeLessThan(1 << 20);
  });

  it('map --start-offset/--max-length: the same JSON as qemu-img, edge cases included', async () => {
    run('qemu-img', ['create', '-f', 'qcow2', 'mm.qcow2', '8M'], dir);
    run('qemu-io', ['-c', 'write -P 1 0 128k', '-c', 'write -P 2 1M 64k', 'mm.qcow2'], dir);
    for (const extra of [['--start-offset=32k', '--max-length=1M'], ['--start-offset=100M'], ['--start-offset=7M', '--max-length=10M'], ['--max-length=0'], ['--start-offset=1000']]) {
      const q = run('qemu-img', ['map', '--output=json', ...extra, 'mm.qcow2'], dir);
      const o = await runImg(['map', '--output=json', ...extra, 'mm.qcow2'], dir);
      expect(o.stdout, extra.join(' ')).toBe(q.stdout);
    }
  });

  it('convert refuses to overwrite its source or a backing file of it', async () => {
    run('qemu-img', ['create', '-f', 'qcow2', '-b', 'back.qcow2', '-F', 'qcow2', 'over.qcow2'], dir);
    const before = readFileSync(join(dir, 'back.qcow2'));
    for (const target of ['over.qcow2', 'back.qcow2']) {
      const o = await runImg(['convert', '-O', 'qcow2', 'over.qcow2', target], dir);
      expect(o.status).toBe(1);
      expect(o.stderr).toMatch(/convert: the target/);
    }
    expect(readFileSync(join(dir, 'back.qcow2')).equals(before)).toBe(true);
    expect(run('qemu-img', ['check', 'over.qcow2'], dir).status).toBe(0);
  });

  it('bad input: missing file, garbage file, bad option values — one line, exit 1 as qemu-img', async () => {
    writeFileSync(join(dir, 'junk.qcow2'), Buffer.from('QFI\xfbgarbage'));
    const cases: [string[], number][] = [
      [['info', 'nope.qcow2'], 1],
      [['info', '-f', 'qcow2', 'junk.qcow2'], 1],
      [['map', '-f', 'qcow2', 'junk.qcow2'], 1],
      [['check', '-f', 'qcow2', 'junk.qcow2'], 1],
      [['info', '--output=xml', 'back.qcow2'], 1],
      [['check', '-r', 'some', 'back.qcow2'], 1],
      [['io', 'back.qcow2'], 1],
      [['info'], 1],
    ];
    for (const [args, code] of cases) {
      const o = await runImg(args, dir);
      expect(o.status, args.join(' ')).toBe(code);
      expect(o.stderr.trim().split('\n'), args.join(' ')).toHaveLength(1);
    }
  });
});
