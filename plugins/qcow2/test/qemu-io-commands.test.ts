import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { HAVE_QEMU, run } from '../../../test/interop/img-qemu.js';
import { cvtstr, parseIoCommand, parsePattern, runIoCommand, type IoTarget } from '../cli/qemu-io-commands.js';

/** A raw file as an IoTarget: the simplest real image, so commands can be compared with `qemu-io -f raw`. */
class RawFile implements IoTarget {
  constructor(private readonly fh: FileHandle, readonly virtualSize: number) {}
  static async open(path: string): Promise<RawFile> {
    const fh = await open(path, 'r+');
    return new RawFile(fh, (await fh.stat()).size);
  }
  async read(offset: number, length: number): Promise<Uint8Array> {
    const buf = Buffer.alloc(length);
    await this.fh.read(buf, 0, length, offset);
    return buf;
  }
  async write(offset: number, data: Uint8Array): Promise<void> {
    await this.fh.write(data, 0, data.length, offset);
  }
  async writeZeroes(offset: number, length: number): Promise<void> {
    await this.write(offset, new Uint8Array(length));
  }
  async discard(offset: number, length: number): Promise<void> {
    await this.writeZeroes(offset, length);
  }
  close(): Promise<void> {
    return this.fh.close();
  }
}

/** Run commands like qemu-io does: in order, all of them, exit 1 if any failed. */
async function ours(path: string, cmds: string[]): Promise<{ stdout: string; stderr: string; status: number }> {
  const f = await RawFile.open(path);
  let stdout = '';
  let stderr = '';
  let failed = false;
  for (const c of cmds) {
    const ok = await runIoCommand(f, c, { out: (l) => (stdout += l + '\n'), err: (l) => (stderr += l + '\n') });
    if (!ok) failed = true;
  }
  await f.close();
  return { stdout, stderr, status: failed ? 1 : 0 };
}

/** Output without the timing lines, which differ run to run. */
function stable(text: string): string {
  return text.split('\n').filter((l) => !/ ops; /.test(l)).join('\n');
}

describe('parseIoCommand', () => {
  it('parses options grouped or separate, with aliases', () => {
    const p = parseIoCommand('r -qvP0xab 1k 512');
    expect(p).toMatchObject({ ok: true, name: 'read', offset: 1024, length: 512 });
    if (p.ok) expect([...p.opts]).toEqual([['q', true], ['v', true], ['P', '0xab']]);
    expect(parseIoCommand('write -z -u 0 64k')).toMatchObject({ ok: true, name: 'write', length: 65536 });
  });

  it('refuses bad commands with qemu-io\'s messages', () => {
    expect(parseIoCommand('bogus 0 1')).toEqual({ ok: false, stream: 'err', message: 'command "bogus" not found' });
    expect(parseIoCommand('read')).toEqual({ ok: false, stream: 'err', message: 'bad argument count 0 to read, expected at least 2 arguments' });
    expect(parseIoCommand('write -P 300 0 1')).toEqual({ ok: false, stream: 'out', message: '300 is not a valid pattern byte' });
    expect(parseIoCommand('write -z -P 1 0 1')).toMatchObject({ ok: false, message: 'Only one of -z, -P, and -s can be specified at the same time' });
    expect(parseIoCommand('read 0 abc')).toMatchObject({ ok: false, message: 'Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- abc' });
    expect(parseIoCommand('read 0 3G')).toMatchObject({ ok: false, message: 'length cannot exceed 2147483136, given 3G' });
    expect(parseIoCommand('read -X 0 1')).toMatchObject({ ok: false, stream: 'err' });
  });

  it('reads pattern bytes like strtol(…, 0)', () => {
    expect(parsePattern('0xab')).toBe(0xab);
    expect(parsePattern('017')).toBe(15);
    expect(parsePattern('255')).toBe(255);
    expect(parsePattern('256')).toBeUndefined();
    expect(parsePattern('x')).toBeUndefined();
  });

  it('formats byte counts like cvtstr', () => {
    expect(cvtstr(65536)).toBe('64 KiB');
    expect(cvtstr(512)).toBe('512 bytes');
    expect(cvtstr(861.186991)).toBe('861.186991 bytes');
    expect(cvtstr(1.5 * 2 ** 20)).toBe('1.500 MiB');
  });
});

describe('runIoCommand', () => {
  const dir = mkdtempSync(join(tmpdir(), 'img-io-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('writes, verifies, and fails a wrong pattern with exit 1 while running the rest', async () => {
    const f = join(dir, 'a.raw');
    writeFileSync(f, Buffer.alloc(1 << 20));
    const r = await ours(f, ['write -P 0xab 4096 8192', 'read -P 0xab 4096 8192', 'read -P 0xcd 4096 512', 'write -z 4096 512', 'read -P 0 4096 512']);
    expect(r.status).toBe(1);
    expect(stable(r.stdout)).toBe([
      'wrote 8192/8192 bytes at offset 4096',
      'read 8192/8192 bytes at offset 4096',
      'Pattern verification failed at offset 4096, 512 bytes',
      'read 512/512 bytes at offset 4096',
      'wrote 512/512 bytes at offset 4096',
      'read 512/512 bytes at offset 4096',
      '',
    ].join('\n'));
    const data = readFileSync(f);
    expect(data.subarray(4096, 4608).every((b) => b === 0)).toBe(true);
    expect(data.subarray(4608, 12288).every((b) => b === 0xab)).toBe(true);
  });

  it('refuses a range past the end without touching the file', async () => {
    const f = join(dir, 'b.raw');
    writeFileSync(f, Buffer.alloc(4096));
    const r = await ours(f, ['write 4000 200']);
    expect(r).toMatchObject({ status: 1, stdout: 'write failed: Input/output error\n' });
    expect(readFileSync(f).every((b) => b === 0)).toBe(true);
  });
});

describe.skipIf(!HAVE_QEMU)('runIoCommand against qemu-io -f raw', () => {
  const dir = mkdtempSync(join(tmpdir(), 'img-io-q-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const scripts: string[][] = [
    ['write 0 4k', 'write -P 0x5a 1000 3000', 'read -P 0x5a 1000 3000', 'read -P 0xcd 0 1000'],
    ['write -P 7 0 64k', 'write -z 512 1k', 'discard 8k 4k', 'read -v 500 40', 'read -P 7 0 512'],
    ['read -P 1 0 512', 'write -P 1 0 512', 'read -P 1 0 512', 'read 2M 1'],
    ['bogus', 'read', 'write -P 300 0 1', 'write -z -P 1 0 1', 'read 0 abc', 'write -u 0 1', 'read 0 3G', 'read -qP 0 0 0'],
    ['write -P 0x7e 0 1', 'read -v 0 2', 'w 1k 1k', 'r -P 0xcd 1k 1k'],
  ];

  it.each(scripts.map((s, i) => [i, s] as const))('script %i: same stdout, stderr, exit code and file', async (i, script) => {
    const mine = join(dir, `m${i}.raw`);
    const theirs = join(dir, `t${i}.raw`);
    const seed = Buffer.alloc(1 << 20);
    for (let j = 0; j < seed.length; j += 4096) seed[j] = j & 0xff;
    writeFileSync(mine, seed);
    copyFileSync(mine, theirs);
    const q = run('qemu-io', ['-f', 'raw', ...script.flatMap((c) => ['-c', c]), theirs], dir);
    const o = await ours(mine, script);
    expect(stable(o.stdout)).toBe(stable(q.stdout));
    expect(o.status).toBe(q.status);
    // stderr: the same lines for what qemu-io reports there (our option errors differ in wording).
    expect(o.stderr.split('\n').filter((l) => l.startsWith('command') || l.startsWith('bad argument')))
      .toEqual(q.stderr.split('\n').filter((l) => l.startsWith('command') || l.startsWith('bad argument')));
    expect(readFileSync(mine).equals(readFileSync(theirs))).toBe(true);
  });
});
