/**
 * `offload img stream|commit|rebase` on chains made by qemu-img: same results as qemu-img's
 * commit/rebase, qemu-img's messages and exit codes for the usual mistakes.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { runImg } from './img-cli.js';
import { HAVE_QEMU, backingOf, check, compare, copyDir, qimg, qio, tempDir } from './jobs-support.js';

const img = runImg;

const cleanups: (() => void)[] = [];
afterAll(() => cleanups.forEach((c) => c()));

function chain(): string {
  const t = tempDir('jobs-cli-');
  cleanups.push(t.cleanup);
  const d = t.dir;
  qimg(d, 'create', '-f', 'qcow2', 'base.qcow2', '4M');
  qio(d, 'base.qcow2', ['write -P 1 0 2M']);
  qimg(d, 'create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2');
  qio(d, 'mid.qcow2', ['write -P 2 512k 1M', 'write -z 1536k 64k']);
  qimg(d, 'create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', '6M');
  qio(d, 'top.qcow2', ['write -P 3 1M 64k', 'write -P 4 5M 64k']);
  return d;
}

function twin(d: string): string {
  const t = tempDir('jobs-cli-ref-');
  cleanups.push(t.cleanup);
  copyDir(d, t.dir);
  return t.dir;
}

describe.skipIf(!HAVE_QEMU)('offload img stream/commit/rebase', () => {
  it('commit empties the top like qemu-img commit; -d keeps it; -b implies -d', async () => {
    for (const args of [[], ['-d'], ['-b', 'base.qcow2']]) {
      const ours = chain();
      const ref = twin(ours);
      const r = await img(['commit', ...args, 'top.qcow2'], ours);
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout).toBe('Image committed.\n');
      qimg(ref, 'commit', ...args, 'top.qcow2');
      for (const f of ['top.qcow2', 'mid.qcow2', 'base.qcow2']) {
        expect(compare(ours, f, `${ref}/${f}`).status, `${args.join(' ')}: ${f}`).toBe(0);
        expect(check(ours, f).status).toBe(0);
      }
      // The emptied top allocates nothing, as qemu-img leaves it.
      expect(qimg(ours, 'map', '--output=json', 'top.qcow2')).toBe(qimg(ref, 'map', '--output=json', 'top.qcow2'));
    }
  });

  it('rebase -b, -b "" and -u behave as qemu-img rebase', async () => {
    for (const args of [['-b', 'base.qcow2', '-F', 'qcow2'], ['-b', ''], ['-u', '-b', 'base.qcow2', '-F', 'qcow2'], ['-u']]) {
      const ours = chain();
      const ref = twin(ours);
      const r = await img(['rebase', ...args, 'top.qcow2'], ours);
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout).toBe('');
      qimg(ref, 'rebase', ...args, 'top.qcow2');
      expect(compare(ours, 'top.qcow2', `${ref}/top.qcow2`).status, args.join(' ')).toBe(0);
      expect(backingOf(ours, 'top.qcow2')).toBe(backingOf(ref, 'top.qcow2'));
      expect(check(ours, 'top.qcow2').status).toBe(0);
    }
  });

  it('stream [--base B] flattens or keeps the base; content unchanged', async () => {
    for (const args of [[], ['--base', 'base.qcow2']]) {
      const d = chain();
      const before = twin(d);
      const r = await img(['stream', '-p', ...args, 'top.qcow2'], d);
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout).toBe('Image streamed.\n');
      expect(backingOf(d, 'top.qcow2')).toBe(args.length ? 'base.qcow2' : '');
      expect(compare(d, 'top.qcow2', `${before}/top.qcow2`).status).toBe(0);
      expect(check(d, 'top.qcow2').status).toBe(0);
    }
  });

  it("qemu-img's messages for the usual mistakes, and nothing changes", async () => {
    const d = chain();
    const before = twin(d);
    let r = await img(['rebase', 'top.qcow2'], d);
    expect(r.status).toBe(1);
    expect(r.stderr.trim()).toBe('offload: Must specify backing file (-b) or use unsafe mode (-u)');
    r = await img(['rebase', '-b', 'base.qcow2', 'top.qcow2'], d);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain("Could not change the backing file to 'base.qcow2': backing format must be specified");
    r = await img(['commit', 'base.qcow2'], d);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('Image does not have a backing file');
    r = await img(['commit', '-b', 'zz.qcow2', 'top.qcow2'], d);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain("Did not find 'zz.qcow2' in the backing chain of");
    r = await img(['stream', '--base', 'top.qcow2', 'top.qcow2'], d);
    expect(r.status).toBe(1);
    r = await img(['rebase', '-b', 'nonexistent.qcow2', '-F', 'qcow2', 'top.qcow2'], d);
    expect(r.status).toBe(1);
    for (const f of ['top.qcow2', 'mid.qcow2', 'base.qcow2']) expect(compare(d, f, `${before}/${f}`).status).toBe(0);
    expect(backingOf(d, 'top.qcow2')).toBe('mid.qcow2');
  });
});
