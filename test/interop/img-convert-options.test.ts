/**
 * `offload img convert -B/-F, -n, -c` and `compare -s`, next to qemu-img 7.2 with the same
 * arguments on the same files: the maps, the checks, the outputs and exit codes.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runImg } from './img-cli.js';
import { HAVE_QEMU, run } from './img-qemu.js';

describe.skipIf(!HAVE_QEMU)('offload img convert -B -n -c and compare -s next to qemu-img', () => {
  let dir: string;
  const sh = (cmd: string, ...args: string[]) => {
    const r = run(cmd, args, dir);
    expect(r.status, `${cmd} ${args.join(' ')}: ${r.stderr}`).toBe(0);
    return r.stdout;
  };
  const io = (file: string, ...cmds: string[]) => sh('qemu-io', ...cmds.flatMap((c) => ['-c', c]), file);
  const map = (file: string) => sh('qemu-img', 'map', '--output=json', file).replace(/, "offset": \d+/g, '');
  const endOffset = (file: string) => /Image end offset: (\d+)/.exec(run('qemu-img', ['check', file], dir).stdout)?.[1];
  const checkClean = (file: string) => expect(sh('qemu-img', 'check', file)).toMatch(/No errors were found/);
  const identical = (a: string, b: string) => expect(run('qemu-img', ['compare', a, b], dir).stdout).toMatch(/Images are identical/);
  /** Both tools with the same arguments, `X` standing for each one's target. */
  const both = async (args: string[], target: (who: string) => string) => {
    const q = run('qemu-img', args.map((a) => (a === 'X' ? target('q') : a)), dir);
    const o = await runImg(args.map((a) => (a === 'X' ? target('o') : a)), dir);
    return { q, o };
  };

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'img-convert-opts-'));
    // base: 1 MiB of a pattern; top over it: a zeroed cluster over the base's data, 1 MiB and a
    // cluster of other patterns, and 4 KiB in its last cluster, which is partial (4 MiB + 4 KiB).
    // noise: a cluster of random data, which deflate does not shrink.
    sh('qemu-img', 'create', '-f', 'qcow2', 'base.qcow2', '4100k');
    io('base.qcow2', 'write -P 1 0 1M');
    sh('qemu-img', 'create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2');
    io('top.qcow2', 'write -P 2 1M 1M', 'write -z 0 64k', 'write -P 4 3M 64k', 'write -P 3 4096k 4k');
    sh('cp', 'base.qcow2', 'base2.qcow2');
    sh('dd', 'if=/dev/urandom', 'of=noise.raw', 'bs=64k', 'count=1', 'status=none');
    sh('qemu-img', 'convert', '-O', 'qcow2', 'noise.raw', 'noise.qcow2');
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('-B/-F: the target has the backing file and only the source top image\'s allocations, as qemu-img makes it', async () => {
    const { q, o } = await both(['convert', '-O', 'qcow2', '-B', 'base2.qcow2', '-F', 'qcow2', 'top.qcow2', 'X'], (w) => `${w}-b.qcow2`);
    expect(q.status, q.stderr).toBe(0);
    expect(o.status, o.stderr).toBe(0);
    expect(map('o-b.qcow2')).toBe(map('q-b.qcow2'));
    expect(sh('qemu-img', 'info', 'o-b.qcow2')).toMatch(/backing file: base2\.qcow2\nbacking file format: qcow2/);
    identical('top.qcow2', 'o-b.qcow2');
    checkClean('o-b.qcow2');
    // Into 4 KiB clusters from 64 KiB ones: partial target clusters keep the backing file's bytes around what is written.
    const small = await runImg(['convert', '-O', 'qcow2', '-o', 'cluster_size=512', '-B', 'base2.qcow2', '-F', 'qcow2', 'top.qcow2', 'o-b512.qcow2'], dir);
    expect(small.status, small.stderr).toBe(0);
    identical('top.qcow2', 'o-b512.qcow2');
  });

  it('-B from a source with no backing file, and past the end of a shorter one: zeros there, not the new backing\'s bytes', async () => {
    sh('qemu-img', 'create', '-f', 'qcow2', 'full.qcow2', '4M');
    io('full.qcow2', 'write -P 7 0 4M');
    sh('qemu-img', 'create', '-f', 'qcow2', 'alone.qcow2', '4M');
    io('alone.qcow2', 'write -P 1 1M 64k');
    sh('qemu-img', 'create', '-f', 'qcow2', 'short.qcow2', '2M');
    io('short.qcow2', 'write -P 7 0 2M');
    sh('qemu-img', 'create', '-f', 'qcow2', '-b', 'short.qcow2', '-F', 'qcow2', 'long.qcow2', '4M');
    io('long.qcow2', 'write -P 2 2M 64k');
    for (const source of ['alone.qcow2', 'long.qcow2']) {
      const { q, o } = await both(['convert', '-O', 'qcow2', '-B', 'full.qcow2', '-F', 'qcow2', source, 'X'], (w) => `${w}-${source}`);
      expect([q.status, o.status], o.stderr).toEqual([0, 0]);
      identical(source, `o-${source}`);
      expect(map(`o-${source}`)).toBe(map(`q-${source}`));
    }
  });

  it('-B refusals: no -F, a raw target, a backing file that does not open (no target left behind), -F alone', async () => {
    const cases: [string[], RegExp][] = [
      [['-O', 'qcow2', '-F', 'qcow2', 'top.qcow2', 'bad0.qcow2'], /Backing format cannot be used without backing file/],
      [['-O', 'qcow2', '-B', 'base2.qcow2', 'top.qcow2', 'bad1.qcow2'], /Use of backing file requires explicit backing format/],
      [['-B', 'base2.qcow2', '-F', 'qcow2', 'top.qcow2', 'bad2.raw'], /Backing file not supported for file format 'raw'/],
      [['-O', 'qcow2', '-B', 'missing.qcow2', '-F', 'qcow2', 'top.qcow2', 'bad3.qcow2'], /missing\.qcow2/],
    ];
    for (const [args, msg] of cases) {
      expect(run('qemu-img', ['convert', ...args.slice(0, -1), `q-${args.at(-1)!}`], dir).status).toBe(1);
      const o = await runImg(['convert', ...args], dir);
      expect(o.status).toBe(1);
      expect(o.stderr).toMatch(msg);
      expect(o.stderr.trim().split('\n')).toHaveLength(1);
      expect(existsSync(join(dir, args.at(-1)!))).toBe(false);
    }
  });

  it('-n: into an existing larger image over old data, as qemu-img writes it; refusals', async () => {
    for (const w of ['q', 'o']) {
      sh('qemu-img', 'create', '-f', 'qcow2', `${w}-n.qcow2`, '8M');
      io(`${w}-n.qcow2`, 'write -P 9 0 8M');
    }
    const { q, o } = await both(['convert', '-n', '-O', 'qcow2', 'top.qcow2', 'X'], (w) => `${w}-n.qcow2`);
    expect(q.status, q.stderr).toBe(0);
    expect(o.status, o.stderr).toBe(0);
    expect(map('o-n.qcow2')).toBe(map('q-n.qcow2'));
    identical('o-n.qcow2', 'q-n.qcow2');
    // The source's zeros overwrote the old data; past the source's end it is as it was.
    expect(io('o-n.qcow2', 'read -P 0 2M 64k', 'read -P 9 4100k 4092k')).not.toMatch(/Pattern verification failed/);
    checkClean('o-n.qcow2');
    // -n and -B: the top image's allocations only; the rest of the target untouched.
    sh('qemu-img', 'create', '-f', 'qcow2', '-b', 'base2.qcow2', '-F', 'qcow2', 'o-nb.qcow2', '4100k');
    sh('cp', 'o-nb.qcow2', 'q-nb.qcow2');
    const nb = await both(['convert', '-n', '-B', 'base2.qcow2', '-O', 'qcow2', 'top.qcow2', 'X'], (w) => `${w}-nb.qcow2`);
    expect([nb.q.status, nb.o.status]).toEqual([0, 0]);
    expect(map('o-nb.qcow2')).toBe(map('q-nb.qcow2'));
    identical('top.qcow2', 'o-nb.qcow2');

    sh('qemu-img', 'create', '-f', 'qcow2', 'small.qcow2', '2M');
    const before = readFileSync(join(dir, 'o-n.qcow2'));
    const refusals: [string[], RegExp][] = [
      [['-n', '-O', 'qcow2', 'top.qcow2', 'small.qcow2'], /output file is smaller than input file/],
      [['-n', '-O', 'qcow2', '-o', 'cluster_size=4k', 'top.qcow2', 'o-n.qcow2'], /-o has no effect when skipping image creation/],
      [['-n', '-O', 'qcow2', 'top.qcow2', 'absent.qcow2'], /absent\.qcow2/],
      // qemu-img would write it as raw (its -O default) over the qcow2 image: refused here, the image as it was.
      [['-n', 'top.qcow2', 'o-n.qcow2'], /is a qcow2 image, and -O is raw \(the default\)/],
    ];
    for (const [args, msg] of refusals) {
      const r = await runImg(['convert', ...args], dir);
      expect(r.status, args.join(' ')).toBe(1);
      expect(r.stderr).toMatch(msg);
    }
    expect(readFileSync(join(dir, 'o-n.qcow2')).equals(before)).toBe(true);
    expect(existsSync(join(dir, 'absent.qcow2'))).toBe(false);
  });

  it('-c: compressed clusters qemu-img checks clean and reads back, packed as qemu-img packs them', async () => {
    const { q, o } = await both(['convert', '-c', '-O', 'qcow2', 'top.qcow2', 'X'], (w) => `${w}-c.qcow2`);
    expect(q.status, q.stderr).toBe(0);
    expect(o.status, o.stderr).toBe(0);
    checkClean('o-c.qcow2');
    identical('top.qcow2', 'o-c.qcow2');
    expect(map('o-c.qcow2')).toBe(map('q-c.qcow2'));
    const check = sh('qemu-img', 'check', 'o-c.qcow2');
    expect(check).toMatch(/100\.00% compressed clusters/);
    // The same deflate, packed the same way: the file ends where qemu-img's does.
    expect(endOffset('o-c.qcow2')).toBe(endOffset('q-c.qcow2'));
    expect(statSync(join(dir, 'o-c.qcow2')).size).toBeLessThan(statSync(join(dir, 'q-c.qcow2')).size + 65536);
    // offload reads it back too (and compare -s sees it as qemu-img does: compressed both).
    expect((await runImg(['compare', '-s', 'top.qcow2', 'o-c.qcow2'], dir)).stdout).toBe(run('qemu-img', ['compare', '-s', 'top.qcow2', 'q-c.qcow2'], dir).stdout);
    expect((await runImg(['compare', '-s', 'q-c.qcow2', 'o-c.qcow2'], dir)).stdout).toMatch(/Images are identical/);

    // Random data does not shrink: a normal cluster, as qemu-img writes it; into small clusters; into an empty image with -n.
    for (const [args, out] of [
      [['convert', '-c', '-O', 'qcow2', 'noise.qcow2', 'o-cn.qcow2'], 'o-cn.qcow2'],
      [['convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4k', 'top.qcow2', 'o-c4k.qcow2'], 'o-c4k.qcow2'],
    ] as const) {
      const r = await runImg([...args], dir);
      expect(r.status, r.stderr).toBe(0);
      checkClean(out);
      identical(args.at(-2)!, out);
    }
    expect(sh('qemu-img', 'check', 'o-cn.qcow2')).toMatch(/0\.00% compressed clusters/);
    sh('qemu-img', 'create', '-f', 'qcow2', 'o-cempty.qcow2', '4100k');
    expect((await runImg(['convert', '-c', '-n', '-O', 'qcow2', 'top.qcow2', 'o-cempty.qcow2'], dir)).status).toBe(0);
    checkClean('o-cempty.qcow2');
    identical('top.qcow2', 'o-cempty.qcow2');

    // Refused: a raw target; over allocated clusters (qemu-img: an I/O error at the first one).
    const raw = await runImg(['convert', '-c', 'top.qcow2', 'o-c.raw'], dir);
    expect(raw.stderr).toMatch(/Compression not supported for this file format/);
    expect(run('qemu-img', ['convert', '-c', '-n', '-O', 'qcow2', 'top.qcow2', 'q-n.qcow2'], dir).status).toBe(1);
    const over = await runImg(['convert', '-c', '-n', '-O', 'qcow2', 'top.qcow2', 'o-n.qcow2'], dir);
    expect(over.status).toBe(1);
    expect(over.stderr).toMatch(/FailedPrecondition: .*cannot write compressed data at \d+: the cluster is allocated/);
  });

  it('compare -s: the same verdict and offset as qemu-img on images alike in content and not in allocation', async () => {
    sh('qemu-img', 'create', '-f', 'qcow2', 'e1.qcow2', '4M');
    sh('qemu-img', 'create', '-f', 'qcow2', 'e2.qcow2', '4M');
    io('e2.qcow2', 'write -z 0 64k'); // zero cluster vs unallocated
    sh('qemu-img', 'create', '-f', 'qcow2', 'e3.qcow2', '4M');
    io('e3.qcow2', 'write -P 0 0 64k'); // zeros as data
    sh('qemu-img', 'create', '-f', 'qcow2', 'e4.qcow2', '8M');
    sh('qemu-img', 'create', '-f', 'qcow2', 'f1.qcow2', '4M');
    io('f1.qcow2', 'write -P 3 0 4M');
    sh('qemu-img', 'create', '-f', 'qcow2', 'f2.qcow2', '4M');
    io('f2.qcow2', 'write -P 3 2M 2M', 'write -P 3 0 2M'); // the same bytes, the halves swapped in the file
    sh('qemu-img', 'convert', '-O', 'raw', 'f1.qcow2', 'f1.raw');
    sh('qemu-img', 'create', '-f', 'raw', 'hole.raw', '4M');
    sh('qemu-img', 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', 'k.qcow2', '4M'); // L2 tables of 2 MiB
    io('k.qcow2', 'write -P 3 0 4M');
    // Its L2 tables first (zeros), then data contiguous in the file across them: one run in the
    // map, two answers for qemu's block status (the first does not reach the end).
    sh('qemu-img', 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', 'k2.qcow2', '4M');
    io('k2.qcow2', 'write -z 0 4M', 'write -P 3 0 4M');
    sh('qemu-img', 'create', '-f', 'qcow2', 'g1.qcow2', '4M');
    io('g1.qcow2', 'write -P 5 1M 64k');
    sh('qemu-img', 'create', '-f', 'qcow2', 'g2.qcow2', '4M');
    io('g2.qcow2', 'write -z 0 64k', 'write -P 6 1M 64k'); // status differs before the content does
    sh('qemu-img', 'convert', '-O', 'qcow2', 'top.qcow2', 'flat.qcow2');
    sh('qemu-img', 'convert', '-c', '-O', 'qcow2', 'f1.qcow2', 'f1c.qcow2');
    // Chains: an empty overlay (over qcow2, over raw), one over a shorter backing file, and their flattened copies.
    sh('qemu-img', 'create', '-f', 'qcow2', '-b', 'f1.qcow2', '-F', 'qcow2', 'ov.qcow2');
    sh('qemu-img', 'create', '-f', 'qcow2', '-b', 'f1.raw', '-F', 'raw', 'ovr.qcow2');
    sh('qemu-img', 'create', '-f', 'qcow2', '-b', 'g1.qcow2', '-F', 'qcow2', 'ovl.qcow2', '8M');
    io('ovl.qcow2', 'write -P 8 5M 64k');
    sh('qemu-img', 'convert', '-O', 'qcow2', 'ovl.qcow2', 'ovl-flat.qcow2');
    const pairs = [
      ['e1.qcow2', 'e1.qcow2'], ['e1.qcow2', 'e2.qcow2'], ['e2.qcow2', 'e3.qcow2'], ['e1.qcow2', 'e4.qcow2'], ['f1.qcow2', 'f2.qcow2'],
      ['f1.qcow2', 'f1.raw'], ['hole.raw', 'e1.qcow2'], ['hole.raw', 'hole.raw'], ['k.qcow2', 'f1.raw'], ['k2.qcow2', 'f1.raw'], ['k2.qcow2', 'k2.qcow2'], ['g1.qcow2', 'g2.qcow2'],
      ['g2.qcow2', 'g1.qcow2'], ['top.qcow2', 'flat.qcow2'], ['top.qcow2', 'base.qcow2'], ['f1.qcow2', 'f1c.qcow2'], ['f1c.qcow2', 'f1c.qcow2'],
      ['top.qcow2', 'q-b.qcow2'], ['f1.qcow2', 'ov.qcow2'], ['f1.raw', 'ovr.qcow2'], ['ov.qcow2', 'ovr.qcow2'], ['ovl.qcow2', 'ovl-flat.qcow2'],
      ['ovl.qcow2', 'e4.qcow2'], ['ovl.qcow2', 'ovl.qcow2'],
    ];
    for (const [a, b] of pairs) {
      const q = run('qemu-img', ['compare', '-s', a!, b!], dir);
      const o = await runImg(['compare', '-s', a!, b!], dir);
      expect(o.stdout, `${a} ${b}`).toBe(q.stdout);
      expect(o.status, `${a} ${b}`).toBe(q.status);
    }
    // Without -s, the same files compare by content only.
    expect((await runImg(['compare', 'f1.qcow2', 'f2.qcow2'], dir)).stdout).toMatch(/Images are identical/);
  });
});
