/**
 * Images made and written by qemu-img/qemu-io, read by `offload img`: for every variant the
 * issue lists, our `info`/`check`/`map` JSON equals qemu-img's byte for byte, every pattern reads
 * back with `img io -c 'read -P …'`, and `img convert -O raw` is byte-equal to qemu-img's.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runImg } from './img-cli.js';
import { HAVE_QEMU, run } from './img-qemu.js';
import { VARIANTS, buildWithQemu, type Variant } from './img-variants.js';

describe.skipIf(!HAVE_QEMU)('offload img reads images qemu made', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'img-qm-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  describe.each(VARIANTS.map((v) => [v.name, v] as const))('%s', (_name, v: Variant) => {
    let file: string;
    beforeAll(() => {
      file = buildWithQemu(dir, v);
    });

    it('info --output=json (and --backing-chain) equal qemu-img info', async () => {
      for (const extra of [[], ['--backing-chain']]) {
        const q = run('qemu-img', ['info', '--output=json', ...extra, file], dir);
        expect(q.status, q.stderr).toBe(0);
        const o = await runImg(['info', '--output=json', ...extra, file], dir);
        expect(o.stderr).toBe('');
        expect(o.stdout).toBe(q.stdout);
      }
    });

    it('human info equals qemu-img info', async () => {
      const q = run('qemu-img', ['info', file], dir);
      const o = await runImg(['info', file], dir);
      expect(o.stdout).toBe(q.stdout);
    });

    it('check (JSON and human) equals qemu-img check, exit 0', async () => {
      for (const extra of [['--output=json'], []]) {
        const q = run('qemu-img', ['check', ...extra, file], dir);
        const o = await runImg(['check', ...extra, file], dir);
        expect(o.stdout).toBe(q.stdout);
        expect(o.status).toBe(q.status);
      }
    });

    it('map --output=json is byte-identical to qemu-img map', async () => {
      const q = run('qemu-img', ['map', '--output=json', file], dir);
      expect(q.status, q.stderr).toBe(0);
      const o = await runImg(['map', '--output=json', file], dir);
      expect(o.stdout).toBe(q.stdout);
    });

    it('human map equals qemu-img map (or both refuse compressed data)', async () => {
      const q = run('qemu-img', ['map', file], dir);
      const o = await runImg(['map', file], dir);
      if (q.status === 0) {
        expect(o.stdout).toBe(q.stdout);
      } else {
        expect(o.status).toBe(1);
        expect(o.stderr).toContain('compressed clusters');
      }
    });

    it('reads back every pattern written', async () => {
      const o = await runImg(['io', '-r', ...v.reads.flatMap((r) => ['-c', `read -P ${r.pattern} ${r.offset} ${r.length}`]), file], dir);
      expect(o.stdout).not.toContain('Pattern verification failed');
      expect(o.status).toBe(0);
      // A wrong pattern is noticed: exit 1.
      const r0 = v.reads[0]!;
      const bad = await runImg(['io', '-r', '-c', `read -P ${(Number(r0.pattern) + 1) & 0xff} ${r0.offset} ${r0.length}`, file], dir);
      expect(bad.status).toBe(1);
      expect(bad.stdout).toContain(`Pattern verification failed at offset ${r0.offset}, ${r0.length} bytes`);
    });

    it('convert -O raw is byte-equal to qemu-img convert -O raw', async () => {
      const theirs = `${v.name}.q.raw`;
      const mine = `${v.name}.o.raw`;
      expect(run('qemu-img', ['convert', '-O', 'raw', file, theirs], dir).status).toBe(0);
      const o = await runImg(['convert', '-O', 'raw', file, mine], dir);
      expect(o.status, o.stderr).toBe(0);
      expect(readFileSync(join(dir, mine)).equals(readFileSync(join(dir, theirs)))).toBe(true);
      // And compare agrees, both ways round.
      expect((await runImg(['compare', file, mine], dir)).stdout).toBe('Images are identical.\n');
      expect(run('qemu-img', ['compare', file, mine], dir).stdout).toBe('Images are identical.\n');
    });
  });
});
