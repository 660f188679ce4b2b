/**
 * Damaged images and awkward chains through `offload img`: a typed error in one line, exit 1, and
 * no hang; and the chain cases qemu-img handles (missing backing file for `info`, a backing file
 * named relative to a sub-folder, a loop).
 */
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runImg } from './img-cli.js';
import { HAVE_QEMU, run } from './img-qemu.js';

/** A copy of `src` with bytes patched: [offset, bytes][]. */
function patched(dir: string, src: string, name: string, patches: [number, number[]][], truncateTo?: number): string {
  let data = readFileSync(join(dir, src));
  for (const [off, bytes] of patches) Buffer.from(bytes).copy(data, off);
  if (truncateTo !== undefined) data = data.subarray(0, truncateTo);
  writeFileSync(join(dir, name), data);
  return name;
}

const be32 = (n: number) => [(n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255];
const be64 = (n: bigint) => Array.from({ length: 8 }, (_, i) => Number((n >> BigInt(56 - 8 * i)) & 255n));

describe.skipIf(!HAVE_QEMU)('offload img on damaged images and awkward chains', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'img-bad-'));
    expect(run('qemu-img', ['create', '-f', 'qcow2', 'good.qcow2', '64M'], dir).status).toBe(0);
    run('qemu-io', ['-c', 'write -P 5 0 128k', 'good.qcow2'], dir);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const damaged: [string, (dir: string) => string, string][] = [
    ['truncated header', (d) => patched(d, 'good.qcow2', 'trunc.qcow2', [], 40), 'Corrupt'],
    ['version 4', (d) => patched(d, 'good.qcow2', 'v4.qcow2', [[4, be32(4)]]), 'Unsupported'],
    ['unknown incompatible bit', (d) => patched(d, 'good.qcow2', 'incompat.qcow2', [[72, be64(1n << 40n)]]), 'Unsupported'],
    ['encryption', (d) => patched(d, 'good.qcow2', 'crypt.qcow2', [[32, be32(1)]]), 'Unsupported'],
    ['external data file', (d) => patched(d, 'good.qcow2', 'extdata.qcow2', [[72, be64(4n)]]), 'Unsupported'],
    ['l1_size past the file', (d) => patched(d, 'good.qcow2', 'l1size.qcow2', [[36, be32(0x3fffffff)]]), 'Corrupt'],
    ['unaligned L1 offset', (d) => patched(d, 'good.qcow2', 'l1off.qcow2', [[40, be64(0x30001n)]]), 'Corrupt'],
    ['huge snapshot count', (d) => patched(d, 'good.qcow2', 'snaps.qcow2', [[60, be32(0xffffffff)], [64, be64(0x10000n)]]), 'Corrupt'],
  ];

  it.each(damaged)('%s: info, check and map fail with one typed line and exit 1', async (_what, make, code) => {
    const file = make(dir);
    for (const cmd of [['info', '-f', 'qcow2'], ['map', '-f', 'qcow2'], ['check', '-f', 'qcow2']]) {
      const o = await runImg([...cmd, file], dir);
      expect(o.status, `${cmd[0]} ${file}: ${o.stdout}${o.stderr}`).toBe(1);
      expect(o.stdout).toBe('');
      expect(o.stderr.trim().split('\n')).toHaveLength(1);
      expect(o.stderr).toContain(`offload: ${code}: `);
    }
  });

  it('info works without the backing file (like qemu-img), --backing-chain then fails in one line', async () => {
    run('qemu-img', ['create', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', 'orphan.qcow2', '1M'], dir);
    const q = run('qemu-img', ['info', '--output=json', 'orphan.qcow2'], dir);
    const o = await runImg(['info', '--output=json', 'orphan.qcow2'], dir);
    expect(o.stdout).toBe(q.stdout);
    const chain = await runImg(['info', '--backing-chain', 'orphan.qcow2'], dir);
    expect(chain.status).toBe(1);
    expect(chain.stderr.trim().split('\n')).toHaveLength(1);
  });

  it('names backing files as qemu-img does when the image is given with a folder', async () => {
    mkdirSync(join(dir, 'sub'));
    run('qemu-img', ['create', '-f', 'raw', 'sub/base.raw', '4M'], dir);
    run('qemu-img', ['create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'sub/top.qcow2'], dir);
    run('qemu-io', ['-c', 'write -P 3 0 64k', 'sub/top.qcow2'], dir);
    for (const args of [['info', '--backing-chain', '--output=json', 'sub/top.qcow2'], ['info', '--backing-chain', 'sub/top.qcow2'], ['map', 'sub/top.qcow2']]) {
      const q = run('qemu-img', args, dir);
      const o = await runImg(args, dir);
      expect(o.stdout, args.join(' ')).toBe(q.stdout);
    }
  });

  it('a backing chain that loops is refused in one line', async () => {
    run('qemu-img', ['create', '-f', 'qcow2', '-u', '-b', 'loop-b.qcow2', '-F', 'qcow2', 'loop-a.qcow2', '1M'], dir);
    run('qemu-img', ['create', '-f', 'qcow2', '-u', '-b', 'loop-a.qcow2', '-F', 'qcow2', 'loop-b.qcow2', '1M'], dir);
    for (const cmd of [['info', '--backing-chain'], ['map'], ['io', '-c', 'read 0 512'], ['convert', '-O', 'raw']]) {
      const o = await runImg([...cmd, 'loop-a.qcow2', ...(cmd[0] === 'convert' ? ['loop.raw'] : [])], dir);
      expect(o.status, cmd.join(' ')).toBe(1);
      expect(o.stderr.trim().split('\n')).toHaveLength(1);
    }
  });

  it('the global --json prints the value as JSON', async () => {
    copyFileSync(join(dir, 'good.qcow2'), join(dir, 'j.qcow2'));
    const o = await runImg(['info', 'j.qcow2'], dir, { json: true });
    expect(JSON.parse(o.stdout)).toMatchObject({ filename: 'j.qcow2', format: 'qcow2', 'virtual-size': 64 * 1024 * 1024 });
  });
});
