/**
 * `offload img check` on damaged images: the same counters, text and exit codes as qemu-img
 * check (0 clean, 2 corrupted, 3 leaks, 63 unsupported), and `-r leaks` / `-r all` repair so that
 * qemu-img then finds the image clean.
 */
import { closeSync, copyFileSync, mkdtempSync, openSync, rmSync, truncateSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runImg } from './img-cli.js';
import { HAVE_QEMU, run } from './img-qemu.js';

/** Overwrite the 16-bit refcount of `cluster` in the first refcount block (fresh 64 KiB layout: block at 0x20000). */
function setRefcount(path: string, cluster: number, value: number): void {
  const fd = openSync(path, 'r+');
  const b = Buffer.alloc(2);
  b.writeUInt16BE(value);
  writeSync(fd, b, 0, 2, 0x20000 + 2 * cluster);
  closeSync(fd);
}

describe.skipIf(!HAVE_QEMU)('offload img check on damaged images', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'img-check-'));
    expect(run('qemu-img', ['create', '-f', 'qcow2', 'clean.qcow2', '64M'], dir).status).toBe(0);
    expect(run('qemu-io', ['-c', 'write -P 0xab 0 128k', 'clean.qcow2'], dir).status).toBe(0);
    copyFileSync(join(dir, 'clean.qcow2'), join(dir, 'leak.qcow2'));
    setRefcount(join(dir, 'leak.qcow2'), 9, 1);
    setRefcount(join(dir, 'leak.qcow2'), 10, 1);
    // qemu-img only checks clusters inside the file: make it reach past cluster 10.
    truncateSync(join(dir, 'leak.qcow2'), 11 * 0x10000);
    copyFileSync(join(dir, 'clean.qcow2'), join(dir, 'corrupt.qcow2'));
    setRefcount(join(dir, 'corrupt.qcow2'), 5, 0); // the data cluster at 0x50000
    expect(run('qemu-img', ['create', '-f', 'raw', 'plain.raw', '1M'], dir).status).toBe(0);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it.each(['clean', 'leak', 'corrupt'])('%s: same stdout and exit code as qemu-img check (human and JSON)', async (name) => {
    for (const extra of [[], ['--output=json']]) {
      const q = run('qemu-img', ['check', ...extra, `${name}.qcow2`], dir);
      const o = await runImg(['check', ...extra, `${name}.qcow2`], dir);
      expect(o.stdout).toBe(q.stdout);
      expect(o.status).toBe(q.status);
      expect(o.status).toBe({ clean: 0, leak: 3, corrupt: 2 }[name]);
    }
  });

  it('reports the per-cluster findings on stderr as qemu-img does', async () => {
    const o = await runImg(['check', 'leak.qcow2'], dir);
    expect(o.stderr).toContain('Leaked cluster 9 refcount=1 reference=0');
    const c = await runImg(['check', 'corrupt.qcow2'], dir);
    expect(c.stderr).toContain('ERROR cluster 5 refcount=0 reference=1');
  });

  it('-r leaks repairs leaks; qemu-img then finds the image clean', async () => {
    for (const extra of [[], ['--output=json']]) {
      const q = `leak-q${extra.length}.qcow2`;
      const m = `leak-m${extra.length}.qcow2`;
      copyFileSync(join(dir, 'leak.qcow2'), join(dir, q));
      copyFileSync(join(dir, 'leak.qcow2'), join(dir, m));
      const qr = run('qemu-img', ['check', '-r', 'leaks', ...extra, q], dir);
      const or = await runImg(['check', '-r', 'leaks', ...extra, m], dir);
      expect(or.stdout.replaceAll(m, q)).toBe(qr.stdout);
      expect(or.status).toBe(0);
      expect(run('qemu-img', ['check', m], dir).status).toBe(0);
    }
  });

  it('-r all repairs a refcount corruption; qemu-img then finds the image clean and the data intact', async () => {
    copyFileSync(join(dir, 'corrupt.qcow2'), join(dir, 'corrupt-m.qcow2'));
    const or = await runImg(['check', '-r', 'all', 'corrupt-m.qcow2'], dir);
    expect(or.status, or.stdout + or.stderr).toBe(0);
    expect(or.stdout).toContain('The following inconsistencies were found and repaired:');
    expect(or.stdout).toContain('Double checking the fixed image now...\nNo errors were found on the image.');
    expect(run('qemu-img', ['check', 'corrupt-m.qcow2'], dir).status).toBe(0);
    expect(run('qemu-io', ['-r', '-c', 'read -P 0xab 0 128k', 'corrupt-m.qcow2'], dir).stdout).not.toContain('failed');
  });

  it('-r leaks on an image that needs its refcounts rebuilt fails like qemu-img: no report, exit 1', async () => {
    copyFileSync(join(dir, 'corrupt.qcow2'), join(dir, 'corrupt-q.qcow2'));
    copyFileSync(join(dir, 'corrupt.qcow2'), join(dir, 'corrupt-l.qcow2'));
    const q = run('qemu-img', ['check', '-r', 'leaks', 'corrupt-q.qcow2'], dir);
    const o = await runImg(['check', '-r', 'leaks', 'corrupt-l.qcow2'], dir);
    expect(q.status).toBe(1);
    expect(o.status).toBe(1);
    expect(o.stdout).toBe(q.stdout);
    expect(o.stderr).toContain('Check failed');
  });

  it('a raw image has no check: exit 63, like qemu-img', async () => {
    const q = run('qemu-img', ['check', '-f', 'raw', 'plain.raw'], dir);
    const o = await runImg(['check', '-f', 'raw', 'plain.raw'], dir);
    expect(q.status).toBe(63);
    expect(o.status).toBe(63);
    expect(o.stderr).toContain('This image format does not support checks');
  });
});
