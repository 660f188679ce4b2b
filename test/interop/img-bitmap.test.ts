/**
 * `offload img bitmap`, `img info` with bitmaps and `img convert --bitmaps` against qemu-img 7.2:
 * the same command lines on two copies of one image leave the same bitmaps (as `qemu-img info`
 * lists them, human and JSON, and as qemu-nbd serves their bits); our `img info` prints exactly
 * what qemu-img prints; bad option combinations and failing actions exit 1 with qemu-img's words.
 */
import { copyFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runImg } from './img-cli.js';
import { HAVE_QEMU, run } from './img-qemu.js';

const q = (dir: string, args: string[]) => run('qemu-img', args, dir);

/** The dirty runs of a bitmap as qemu-nbd serves them (nbdinfo's map text). */
function served(dir: string, file: string, name: string): string {
  const r = run('nbdinfo', [`--map=qemu:dirty-bitmap:${name}`, '--', '[', 'qemu-nbd', '-r', '-B', name, '-f', 'qcow2', file, ']'], dir);
  expect(r.status, r.stderr).toBe(0);
  return r.stdout;
}

function infoOf(dir: string, file: string, output: 'human' | 'json'): string {
  const r = q(dir, ['info', '-U', `--output=${output}`, file]);
  expect(r.status, r.stderr).toBe(0);
  // Everything but the lines that name the file or measure it on disk.
  return r.stdout.split('\n').filter((l) => !/image:|filename|disk size|actual-size/.test(l)).join('\n');
}

describe.skipIf(!HAVE_QEMU)('offload img bitmap / info / convert --bitmaps vs qemu-img', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'img-bitmap-'));
    expect(q(dir, ['create', '-f', 'qcow2', 'base.qcow2', '16M']).status).toBe(0);
    expect(run('qemu-io', ['-c', 'write -P 1 0 1M', 'base.qcow2'], dir).status).toBe(0);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('the same command lines leave the same bitmaps; writes between them mark them the same', async () => {
    copyFileSync(join(dir, 'base.qcow2'), join(dir, 'theirs.qcow2'));
    copyFileSync(join(dir, 'base.qcow2'), join(dir, 'ours.qcow2'));
    const steps: (string[] | { write: string })[] = [
      ['--add', 'b0'],
      ['--add', '-g', '4k', '--disable', 'fine'],
      { write: 'write -P 2 3M 8k' },
      ['--add', '--clear', '--disable', 'later'],
      ['--merge', 'b0', 'later'],
      ['--enable', 'fine'],
      { write: 'write -z 5M 64k' },
      ['--disable', 'b0'],
      ['--add', '-g', '1M', 'coarse'],
      { write: 'discard 7M 1M' },
      ['--clear', 'fine'],
      ['--remove', 'coarse'],
      { write: 'write -P 3 9M 512' },
    ];
    for (const s of steps) {
      if ('write' in s) {
        // qemu-io writes both: the bits come from QEMU's write path on bitmaps each tool made.
        for (const f of ['theirs.qcow2', 'ours.qcow2']) expect(run('qemu-io', ['-f', 'qcow2', '-c', s.write, f], dir).status).toBe(0);
        continue;
      }
      const name = s[s.length - 1]!;
      const opts = s.slice(0, -1);
      expect(q(dir, ['bitmap', ...opts, 'theirs.qcow2', name]).status).toBe(0);
      const o = await runImg(['bitmap', ...opts, 'ours.qcow2', name], dir);
      expect(o.status, o.stderr).toBe(0);
      for (const output of ['human', 'json'] as const) expect(infoOf(dir, 'ours.qcow2', output)).toBe(infoOf(dir, 'theirs.qcow2', output));
    }
    for (const name of ['b0', 'fine', 'later']) expect(served(dir, 'ours.qcow2', name)).toBe(served(dir, 'theirs.qcow2', name));
    expect(served(dir, 'ours.qcow2', 'later')).toMatch(/3145728\s+65536\s+1\s+dirty/);
    // And the other way round: our writes on the bitmaps qemu-img made.
    expect((await runImg(['io', '-c', 'write -P 4 11M 4k', 'theirs.qcow2'], dir)).status).toBe(0);
    expect(run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 4 11M 4k', 'ours.qcow2'], dir).status).toBe(0);
    for (const name of ['b0', 'fine', 'later']) expect(served(dir, 'ours.qcow2', name)).toBe(served(dir, 'theirs.qcow2', name));
    expect(q(dir, ['check', 'ours.qcow2']).status).toBe(0);
    expect(q(dir, ['check', 'theirs.qcow2']).status).toBe(0);
  });

  it('img info prints bitmaps exactly as qemu-img info does, human and JSON', async () => {
    copyFileSync(join(dir, 'base.qcow2'), join(dir, 'info.qcow2'));
    for (const [opts, name] of [[['--add'], 'b0'], [['--add', '-g', '512', '--disable'], 'tiny'], [['--add'], 'x'.repeat(40)]] as const) {
      expect(q(dir, ['bitmap', ...opts, 'info.qcow2', name]).status).toBe(0);
    }
    for (const output of ['human', 'json']) {
      const o = await runImg(['info', `--output=${output}`, 'info.qcow2'], dir);
      expect(o.stdout).toBe(q(dir, ['info', `--output=${output}`, 'info.qcow2']).stdout);
    }
  });

  it.each<[string, string[], RegExp]>([
    ['no action', ['f.qcow2', 'b0'], /Need at least one of --add, --remove, --clear, --enable, --disable, or --merge/],
    ['-g without --add', ['-g', '64k', '--remove', 'f.qcow2', 'b0'], /granularity only supported with --add/],
    ['-b without --merge', ['-b', 'base.qcow2', '--add', 'f.qcow2', 'b0'], /Merge bitmap source file only supported with --merge/],
    ['-F without -b', ['-F', 'qcow2', '--add', 'f.qcow2', 'b0'], /-F only supported with -b/],
    ['a bad granularity', ['--add', '-g', '1000', 'f.qcow2', 'b0'], /Operation add on bitmap b0 failed: Granularity must be power of 2 and at least 512/],
    ['an existing name', ['--add', 'f.qcow2', 'have'], /Operation add on bitmap have failed: Bitmap already exists: have/],
    ['an unknown bitmap', ['--remove', 'f.qcow2', 'nope'], /Operation remove on bitmap nope failed: Dirty bitmap 'nope' not found/],
    ['an unknown merge source', ['--merge', 'nope', 'f.qcow2', 'have'], /Operation merge on bitmap have failed: Dirty bitmap 'nope' not found/],
    ['a source of another size', ['--merge', 'b', '-b', 'big.qcow2', 'f.qcow2', 'have'], /Operation merge on bitmap have failed: Bitmaps are of different sizes \(destination size is 16777216, source size is 33554432\)/],
    ['a name too long', ['--add', 'f.qcow2', 'n'.repeat(1024)], /Name length exceeds maximum \(1023 characters\)/],
    ['no bitmap name', ['--add', 'f.qcow2'], /Expecting filename and bitmap name/],
  ])('%s: exit 1 with qemu-img\'s message, the image unchanged', async (_what, args, message) => {
    copyFileSync(join(dir, 'base.qcow2'), join(dir, 'f.qcow2'));
    expect(q(dir, ['bitmap', '--add', 'f.qcow2', 'have']).status).toBe(0);
    expect(q(dir, ['create', '-f', 'qcow2', 'big.qcow2', '32M']).status).toBe(0);
    expect(q(dir, ['bitmap', '--add', 'big.qcow2', 'b']).status).toBe(0);
    const before = infoOf(dir, 'f.qcow2', 'json');
    const theirs = q(dir, ['bitmap', ...args]);
    expect(theirs.status).toBe(1);
    expect(theirs.stderr).toMatch(message);
    const o = await runImg(['bitmap', ...args], dir);
    expect(o.status).toBe(1);
    expect(o.stderr).toMatch(message);
    expect(infoOf(dir, 'f.qcow2', 'json')).toBe(before);
  });

  it('convert --bitmaps carries them as qemu-img does; an inconsistent one is refused or, with --skip-broken-bitmaps, left out', async () => {
    copyFileSync(join(dir, 'base.qcow2'), join(dir, 'src.qcow2'));
    expect(q(dir, ['bitmap', '--add', 'src.qcow2', 'on']).status).toBe(0);
    expect(q(dir, ['bitmap', '--add', '-g', '4k', 'src.qcow2', 'off']).status).toBe(0);
    expect(run('qemu-io', ['-f', 'qcow2', '-c', 'write 2M 4k', '-c', 'write 6M 100k', 'src.qcow2'], dir).status).toBe(0);
    expect(q(dir, ['bitmap', '--disable', 'src.qcow2', 'off']).status).toBe(0);
    expect(q(dir, ['convert', '--bitmaps', '-O', 'qcow2', 'src.qcow2', 'theirs-c.qcow2']).status).toBe(0);
    const o = await runImg(['convert', '--bitmaps', '-O', 'qcow2', 'src.qcow2', 'ours-c.qcow2'], dir);
    expect(o.status, o.stderr).toBe(0);
    expect(infoOf(dir, 'ours-c.qcow2', 'json')).toBe(infoOf(dir, 'theirs-c.qcow2', 'json'));
    for (const name of ['on', 'off']) expect(served(dir, 'ours-c.qcow2', name)).toBe(served(dir, 'theirs-c.qcow2', name));
    expect(q(dir, ['check', 'ours-c.qcow2']).status).toBe(0);
    // Without --bitmaps: none.
    expect((await runImg(['convert', '-O', 'qcow2', 'src.qcow2', 'plain.qcow2'], dir)).status).toBe(0);
    expect(infoOf(dir, 'plain.qcow2', 'human')).not.toMatch(/bitmaps:/);
    // A raw target cannot hold them.
    expect((await runImg(['convert', '--bitmaps', '-O', 'raw', 'src.qcow2', 'x.raw'], dir)).stderr).toMatch(/Format driver 'raw' does not support bitmaps/);
    // Both flagged in use, as a crashed writer leaves them (QEMU flags disabled ones too); qemu-img
    // walks them newest first, so 'off' is the one it names.
    expect(run('sh', ['-c', "qemu-io -f qcow2 -c 'write 0 4k' -c abort src.qcow2 >/dev/null 2>&1; true"], dir).status).toBe(0);
    expect(infoOf(dir, 'src.qcow2', 'human')).toMatch(/in-use/);
    for (const tool of ['qemu', 'ours'] as const) {
      const args = ['convert', '--bitmaps', '-O', 'qcow2', 'src.qcow2', `${tool}-broken.qcow2`];
      const r = tool === 'qemu' ? q(dir, args) : await runImg(args, dir);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/Cannot copy inconsistent bitmap 'off'/);
      const skip = ['convert', '--bitmaps', '--skip-broken-bitmaps', '-O', 'qcow2', 'src.qcow2', `${tool}-skip.qcow2`];
      const s = tool === 'qemu' ? q(dir, skip) : await runImg(skip, dir);
      expect(s.status).toBe(0);
      expect(s.stderr).toMatch(/Skipping inconsistent bitmap 'off'[^]*Skipping inconsistent bitmap 'on'/);
    }
    expect(infoOf(dir, 'ours-skip.qcow2', 'json')).toBe(infoOf(dir, 'qemu-skip.qcow2', 'json'));
    expect((await runImg(['convert', '--skip-broken-bitmaps', '-O', 'qcow2', 'src.qcow2', 'y.qcow2'], dir)).stderr).toMatch(/requires --bitmaps/);
  });
});
