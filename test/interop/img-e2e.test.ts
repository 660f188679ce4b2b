/**
 * `offload img` through the real executable entry (bin/main.ts): stdout bytes and exit codes next
 * to qemu-img's on the same files, and one-line errors.
 */
import { spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, mkdtempSync, openSync, rmSync, truncateSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { createRequire } from 'node:module';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HAVE_QEMU, run, type RunResult } from './img-qemu.js';

const MAIN = resolve(import.meta.dirname, '../../bin/main.ts');
// The tsx loader by absolute URL: the child runs in a temporary folder, where `--import tsx` would not resolve.
const TSX = pathToFileURL(createRequire(MAIN).resolve('tsx')).href;

function offload(args: string[], cwd: string): RunResult {
  const r = spawnSync(process.execPath, ['--import', TSX, MAIN, ...args], { cwd, encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } });
  return { stdout: r.stdout, stderr: r.stderr, status: r.status ?? -1 };
}

describe.skipIf(!HAVE_QEMU)('offload img end to end (bin/main.ts)', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'img-e2e-'));
    expect(run('qemu-img', ['create', '-f', 'raw', 'base.raw', '8M'], dir).status).toBe(0);
    run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 1M', 'base.raw'], dir);
    expect(run('qemu-img', ['create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'top.qcow2'], dir).status).toBe(0);
    run('qemu-io', ['-c', 'write -P 2 512k 64k', '-c', 'write -z 0 64k', 'top.qcow2'], dir);
    copyFileSync(join(dir, 'top.qcow2'), join(dir, 'leak.qcow2'));
    const fd = openSync(join(dir, 'leak.qcow2'), 'r+');
    writeSync(fd, Buffer.from([0, 1]), 0, 2, 0x20000 + 2 * 9);
    closeSync(fd);
    truncateSync(join(dir, 'leak.qcow2'), 10 * 0x10000); // qemu-img checks clusters inside the file only
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('info --output=json --backing-chain and map --output=json: the bytes qemu-img prints', () => {
    for (const args of [['info', '--output=json', '--backing-chain', 'top.qcow2'], ['map', '--output=json', 'top.qcow2'], ['info', 'top.qcow2']]) {
      const q = run('qemu-img', args, dir);
      const o = offload(['img', ...args], dir);
      expect(o.stderr).toBe('');
      expect(o.stdout).toBe(q.stdout);
      expect(o.status).toBe(0);
    }
  });

  it('check exit codes: 0 clean, 3 leaks', () => {
    for (const f of ['top.qcow2', 'leak.qcow2']) {
      const q = run('qemu-img', ['check', f], dir);
      const o = offload(['img', 'check', f], dir);
      expect(o.stdout).toBe(q.stdout);
      expect(o.status).toBe(q.status);
      expect(o.status).toBe(f === 'top.qcow2' ? 0 : 3);
    }
  });

  it('io: a failed read -P exits 1; the rest of the commands still run', () => {
    const o = offload(['img', 'io', '-c', 'read -P 9 0 512', '-c', 'read -P 2 512k 64k', 'top.qcow2'], dir);
    expect(o.status).toBe(1);
    expect(o.stdout).toMatch(/^Pattern verification failed at offset 0, 512 bytes\nread 512\/512 bytes at offset 0\n.*ops\/sec\)\nread 65536\/65536 bytes at offset 524288\n/);
  });

  it('an unreadable image is one line on stderr and exit 1', () => {
    const o = offload(['img', 'info', '-f', 'qcow2', 'base.raw'], dir);
    expect(o.status).toBe(1);
    expect(o.stdout).toBe('');
    expect(o.stderr.trim().split('\n')).toHaveLength(1);
  });

  it('bad usage exits 1 as qemu-img does (2 would read as "corruptions found" after img check)', () => {
    for (const args of [['check', '--output=josn', 'top.qcow2'], ['check', '--no-such-flag', 'top.qcow2'], ['create', '-f', 'qcow2', 'x.qcow2', '-5']]) {
      const q = run('qemu-img', args, dir);
      const o = offload(['img', ...args], dir);
      expect(q.status, `qemu-img ${args.join(' ')}`).toBe(1);
      expect(o.status, `offload img ${args.join(' ')}`).toBe(1);
      expect(o.stderr.trim().split('\n')).toHaveLength(1);
    }
  });
});
