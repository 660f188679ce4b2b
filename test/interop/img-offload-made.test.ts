/**
 * Images made and written by `offload img`, checked by qemu: `qemu-img check` finds them clean,
 * `qemu-io` reads back every pattern, qemu-img's info matches ours, and internal snapshots go both
 * ways (ours listed and applied by `qemu-img snapshot`, theirs by us).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runImg } from './img-cli.js';
import { HAVE_QEMU, run } from './img-qemu.js';
import { VARIANTS, buildWithOffload, buildWithQemu, type PatternRead, type Variant } from './img-variants.js';

function qemuReads(dir: string, file: string, reads: PatternRead[]) {
  return run('qemu-io', ['-r', ...reads.flatMap((r) => ['-c', `read -P ${r.pattern} ${r.offset} ${r.length}`]), file], dir);
}

describe.skipIf(!HAVE_QEMU)('qemu accepts images offload img made', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'img-om-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const ours = VARIANTS.filter((v) => v.name !== 'compressed');
  describe.each(ours.map((v) => [v.name, v] as const))('%s', (_name, v: Variant) => {
    let file: string;
    beforeAll(async () => {
      file = await buildWithOffload(dir, v);
    });

    it('passes qemu-img check clean', () => {
      const r = run('qemu-img', ['check', file], dir);
      expect(r.stdout + r.stderr).toContain('No errors were found on the image.');
      expect(r.status).toBe(0);
    });

    it('qemu-io reads back every pattern', () => {
      const r = qemuReads(dir, file, v.reads);
      expect(r.stdout).not.toContain('Pattern verification failed');
      expect(r.status, r.stdout + r.stderr).toBe(0);
    });

    it('qemu-img info --backing-chain --output=json equals ours', async () => {
      const q = run('qemu-img', ['info', '--backing-chain', '--output=json', file], dir);
      const o = await runImg(['info', '--backing-chain', '--output=json', file], dir);
      expect(o.stdout).toBe(q.stdout);
    });

    it('qemu-img compare finds it identical to the same steps done by qemu', () => {
      const theirs = buildWithQemu(dir, v);
      const r = run('qemu-img', ['compare', file, theirs], dir);
      expect(r.stdout).toBe('Images are identical.\n');
    });

    if (v.snapshots) {
      it('qemu-img lists our snapshots and applies them', () => {
        const list = run('qemu-img', ['snapshot', '-l', file], dir);
        for (const s of v.snapshots!) expect(list.stdout).toMatch(new RegExp(`^\\d+ +${s.name} `, 'm'));
        for (const s of v.snapshots!) {
          const copy = `${s.name}-applied-by-qemu.qcow2`;
          expect(run('cp', [file, copy], dir).status).toBe(0);
          expect(run('qemu-img', ['snapshot', '-a', s.name, copy], dir).status).toBe(0);
          const r = qemuReads(dir, copy, s.reads);
          expect(r.stdout).not.toContain('Pattern verification failed');
          expect(run('qemu-img', ['check', copy], dir).status).toBe(0);
        }
      });

      it('we list and apply qemu\'s snapshots, and delete ours so that qemu-img check stays clean', async () => {
        const theirs = buildWithQemu(dir, v);
        const q = run('qemu-img', ['snapshot', '-l', theirs], dir);
        const o = await runImg(['snapshot', '-l', theirs], dir);
        expect(o.stdout).toBe(q.stdout);
        for (const s of v.snapshots!) {
          const copy = `${s.name}-applied-by-us.qcow2`;
          expect(run('cp', [theirs, copy], dir).status).toBe(0);
          const a = await runImg(['snapshot', '-a', s.name, copy], dir);
          expect(a.status, a.stderr).toBe(0);
          const r = qemuReads(dir, copy, s.reads);
          expect(r.stdout).not.toContain('Pattern verification failed');
          expect(run('qemu-img', ['check', copy], dir).status).toBe(0);
        }
        const d = await runImg(['snapshot', '-d', v.snapshots![0]!.name, file], dir);
        expect(d.status, d.stderr).toBe(0);
        expect(run('qemu-img', ['check', file], dir).status).toBe(0);
        expect(run('qemu-img', ['snapshot', '-l', file], dir).stdout).not.toMatch(new RegExp(` ${v.snapshots![0]!.name} `));
        expect(qemuReads(dir, file, v.reads).status).toBe(0);
      });
    }
  });
});
