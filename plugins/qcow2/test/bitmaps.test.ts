/**
 * Persistent dirty bitmaps in QEMU's format: interop with qemu-img, qemu-io and qemu-nbd both
 * ways, QEMU 7.2's behaviour after a crash (in_use = inconsistent, never trusted), the crash-safe
 * store, and a kill -9 campaign with bitmaps enabled (12 kills; OFFLOAD_LONG=1 runs 60).
 */
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openImage, type ByteRange, type Image } from '../index.js';
import { decodeBitmapDirectory, encodeBitmapDirectory, type BitmapDirEntry } from '../format/bitmaps.js';
import { hasQemu, ok, qemuCheckJson, qemuIo, run, tempDir, warnIfNoQemu } from './helpers.js';
import { tsChild } from '../../../test/support/ts-child.js';

const here = dirname(fileURLToPath(import.meta.url));
const MiB = 1024 * 1024;
const KILLS = process.env.OFFLOAD_LONG ? 60 : 12;

/** The dirty map qemu-nbd serves for a bitmap, read with nbdinfo: [offset, length] of dirty runs. */
function qemuDirty(file: string, name: string): [number, number][] {
  const out = ok('nbdinfo', [`--map=qemu:dirty-bitmap:${name}`, '--json', '--', '[', 'qemu-nbd', '-r', '-B', name, '-f', 'qcow2', file, ']']);
  return (JSON.parse(out) as { offset: number; length: number; type: number }[])
    .filter((e) => e.type & 1).map((e) => [e.offset, e.length]);
}

const asPairs = (r: ByteRange[]) => r.map((e) => [e.offset, e.length]);

function qemuInfoBitmaps(file: string): unknown {
  const j = JSON.parse(ok('qemu-img', ['info', '-U', '--output=json', file])) as { 'format-specific': { data: { bitmaps?: unknown } } };
  return j['format-specific'].data.bitmaps;
}

function checkClean(file: string, leaksOk = false): void {
  const c = qemuCheckJson(file);
  expect(c.json['corruptions'] ?? 0, JSON.stringify(c.json)).toBe(0);
  if (!leaksOk) expect(c.status, JSON.stringify(c.json)).toBe(0);
}

async function withImage<T>(file: string, readOnly: boolean, fn: (img: Image) => Promise<T>): Promise<T> {
  const img = await openImage(file, { readOnly });
  try {
    return await fn(img);
  } finally {
    await img.close();
  }
}

/** Open `file` read-write in a child process, run `step` (with `img` in scope), and kill -9 it once the step is done. */
async function killedAfter(dir: string, file: string, step: string): Promise<void> {
  const script = join(dir, `killed-${Date.now()}.mts`);
  writeFileSync(script, `import { openImage } from ${JSON.stringify(join(here, '..', 'index.ts'))};
const img = await openImage(${JSON.stringify(file)}, { readOnly: false });
${step}
process.stdout.write('DONE\\n');
setInterval(() => {}, 1000);
`);
  await new Promise<void>((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    child.stdout.on('data', (d: Buffer) => { if (d.toString().includes('DONE')) child.kill('SIGKILL'); });
    child.on('exit', () => resolve());
    child.on('error', reject);
  });
}

describe('bitmap directory codec', () => {
  it('round-trips entries (name padding, extra data) and rejects what QEMU rejects', () => {
    const e: BitmapDirEntry[] = [
      { tableOffset: 0x30000, tableSize: 1, flags: 2, type: 1, granularityBits: 16, name: 'b1', extra: new Uint8Array(0) },
      { tableOffset: 0x40000, tableSize: 3, flags: 5, type: 1, granularityBits: 9, name: 'a-longer-name', extra: new Uint8Array([1, 2, 3]) },
    ];
    const bytes = encodeBitmapDirectory(e);
    expect(bytes.length).toBe(32 + 40); // "b1" is a 32-byte entry [obs]
    expect(decodeBitmapDirectory(bytes, 2)).toEqual(e);
    const bad = bytes.slice();
    bad[17] = 32; // granularity bits past 31
    expect(decodeBitmapDirectory(bad, 2)).toMatch(/granularity bits 32/);
    expect(decodeBitmapDirectory(bytes, 3)).toMatch(/past the directory's end/);
  });
});

describe.skipIf(!hasQemu)('persistent bitmaps and qemu-img', () => {
  warnIfNoQemu('qcow2 bitmaps');
  const t = tempDir('qcow2-bitmaps-');
  afterAll(t.cleanup);
  let n = 0;
  const fresh = (size = 16 * MiB) => {
    const f = join(t.dir, `i${n++}.qcow2`);
    ok('qemu-img', ['create', '-f', 'qcow2', f, String(size)]);
    return f;
  };

  it("reads and updates bitmaps made by qemu-img; qemu-nbd then serves our marks, qemu-img check is clean", async () => {
    const f = fresh();
    ok('qemu-img', ['bitmap', '--add', f, 'b0']);
    ok('qemu-img', ['bitmap', '--add', '-g', '4096', '--disable', f, 'off']);
    ok('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 2M 4k', f]); // QEMU marks b0
    await withImage(f, false, async (img) => {
      expect(await img.bitmaps.info()).toEqual([
        { name: 'b0', granularity: 65536, enabled: true, inconsistent: false, flags: ['auto'] },
        { name: 'off', granularity: 4096, enabled: false, inconsistent: false, flags: [] },
      ]);
      expect(asPairs(await img.bitmaps.dirtyExtents('b0'))).toEqual([[2 * MiB, 65536]]);
      await img.write(MiB + 100, new Uint8Array(70_000).fill(1));
      await img.writeZeroes(9 * MiB, 4096);
      await img.discard(12 * MiB, MiB);
      expect(asPairs(await img.bitmaps.dirtyExtents('b0', MiB, 2 * MiB))).toEqual([[MiB, 2 * 65536], [2 * MiB, 65536]]);
      expect(await img.bitmaps.dirtyExtents('off')).toEqual([]);
    });
    checkClean(f);
    expect(qemuDirty(f, 'b0')).toEqual([[MiB, 2 * 65536], [2 * MiB, 65536], [9 * MiB, 65536], [12 * MiB, MiB]]);
    expect(qemuDirty(f, 'off')).toEqual([]);
    expect(qemuInfoBitmaps(f)).toEqual([{ flags: ['auto'], name: 'b0', granularity: 65536 }, { flags: [], name: 'off', granularity: 4096 }]);
  });

  it('bitmaps we add, merge, disable and clear are listed, checked and changed by qemu-img, and marked by qemu-io', async () => {
    const f = fresh();
    await withImage(f, false, async (img) => {
      await img.bitmaps.add('ours');
      await img.bitmaps.add('fine', { granularity: 512 });
      await img.write(3 * MiB, new Uint8Array(1000).fill(2));
      await img.bitmaps.add('merged', { disabled: true });
      await img.bitmaps.merge('merged', { image: img, name: 'fine' });
      await img.bitmaps.disable('fine');
      await img.write(5 * MiB, new Uint8Array(512).fill(2));
      await expect(img.bitmaps.add('ours')).rejects.toMatchObject({ code: 'AlreadyExists' });
      await expect(img.bitmaps.add('g', { granularity: 3000 })).rejects.toMatchObject({ code: 'InvalidArgument' });
      await expect(img.bitmaps.clear('nope')).rejects.toMatchObject({ code: 'NotFound' });
    });
    checkClean(f);
    expect(qemuInfoBitmaps(f)).toEqual([
      { flags: ['auto'], name: 'ours', granularity: 65536 },
      { flags: [], name: 'fine', granularity: 512 },
      { flags: [], name: 'merged', granularity: 65536 },
    ]);
    expect(qemuDirty(f, 'ours')).toEqual([[3 * MiB, 65536], [5 * MiB, 65536]]);
    expect(qemuDirty(f, 'fine')).toEqual([[3 * MiB, 1024]]);
    expect(qemuDirty(f, 'merged')).toEqual([[3 * MiB, 65536]]);
    // QEMU writes through our bitmaps, and changes them.
    ok('qemu-io', ['-f', 'qcow2', '-c', 'write 7M 4k', f]);
    ok('qemu-img', ['bitmap', '--enable', f, 'fine']);
    ok('qemu-img', ['bitmap', '--merge', 'ours', f, 'fine']);
    ok('qemu-img', ['bitmap', '--clear', f, 'merged']);
    ok('qemu-img', ['bitmap', '--remove', f, 'ours']);
    checkClean(f);
    await withImage(f, true, async (img) => {
      expect((await img.bitmaps.info()).map((b) => [b.name, b.enabled])).toEqual([['fine', true], ['merged', false]]);
      expect(asPairs(await img.bitmaps.dirtyExtents('fine'))).toEqual([[3 * MiB, 65536], [5 * MiB, 65536], [7 * MiB, 65536]]);
      expect(await img.bitmaps.dirtyExtents('merged')).toEqual([]);
    });
  });

  it('a bitmap another image holds merges in (qemu-img bitmap --merge -b), and sizes must match', async () => {
    const a = fresh();
    const b = fresh();
    const c = fresh(32 * MiB);
    ok('qemu-img', ['bitmap', '--add', a, 'src']);
    ok('qemu-io', ['-f', 'qcow2', '-c', 'write 1M 64k', a]);
    await withImage(b, false, async (img) => {
      await img.bitmaps.add('dst');
      await withImage(a, true, (src) => img.bitmaps.merge('dst', { image: src, name: 'src' }));
      expect(asPairs(await img.bitmaps.dirtyExtents('dst'))).toEqual([[MiB, 65536]]);
    });
    await withImage(c, false, async (img) => {
      await img.bitmaps.add('dst');
      await expect(withImage(a, true, (src) => img.bitmaps.merge('dst', { image: src, name: 'src' }))).rejects.toMatchObject({ code: 'FailedPrecondition' });
    });
    checkClean(b);
  });

  it('after a kill -9 of a writer, the bitmap is in-use: qemu-img and we call it inconsistent; only remove works', async () => {
    const f = fresh();
    ok('qemu-img', ['bitmap', '--add', f, 'b0']);
    await killedAfter(t.dir, f, 'await img.write(0, new Uint8Array(4096).fill(1));');
    expect(qemuInfoBitmaps(f)).toEqual([{ flags: ['in-use', 'auto'], name: 'b0', granularity: 65536 }]);
    checkClean(f);
    await withImage(f, false, async (img) => {
      expect(await img.bitmaps.info()).toEqual([{ name: 'b0', granularity: 65536, enabled: true, inconsistent: true, flags: ['in-use', 'auto'] }]);
      // Never trusted: everything may have changed.
      expect(asPairs(await img.bitmaps.dirtyExtents('b0'))).toEqual([[0, 16 * MiB]]);
      expect(asPairs(await img.bitmaps.dirtyExtents('b0', MiB, 4096))).toEqual([[MiB, 4096]]);
      await img.bitmaps.add('ok');
      await expect(img.bitmaps.merge('ok', { image: img, name: 'b0' })).rejects.toMatchObject({ code: 'FailedPrecondition', message: expect.stringMatching(/inconsistent/) });
      await img.bitmaps.remove('ok');
      await expect(img.bitmaps.clear('b0')).rejects.toMatchObject({ code: 'FailedPrecondition' });
      await expect(img.bitmaps.enable('b0')).rejects.toMatchObject({ code: 'FailedPrecondition' });
      await expect(img.resize(32 * MiB)).rejects.toMatchObject({ code: 'FailedPrecondition' });
      await img.write(MiB, new Uint8Array(512));
    });
    // A clean close does not launder it: still in-use, for qemu-img too.
    expect(qemuInfoBitmaps(f)).toEqual([{ flags: ['in-use', 'auto'], name: 'b0', granularity: 65536 }]);
    expect(run('qemu-img', ['bitmap', '--clear', f, 'b0']).stderr).toMatch(/inconsistent/);
    await withImage(f, false, (img) => img.bitmaps.remove('b0'));
    expect(qemuInfoBitmaps(f)).toBeUndefined();
    checkClean(f);
  });

  it('while we hold the image read-write, every bitmap is flagged in use on disk', async () => {
    const f = fresh();
    ok('qemu-img', ['bitmap', '--add', f, 'b0']);
    ok('qemu-img', ['bitmap', '--add', '--disable', f, 'b1']);
    const img = await openImage(f, { readOnly: false });
    try {
      expect(qemuInfoBitmaps(f)).toEqual([{ flags: ['in-use', 'auto'], name: 'b0', granularity: 65536 }, { flags: ['in-use'], name: 'b1', granularity: 65536 }]);
      await withImage(f, true, async (other) => expect((await other.bitmaps.info()).every((b) => b.inconsistent)).toBe(true));
    } finally {
      await img.close();
    }
    expect(qemuInfoBitmaps(f)).toEqual([{ flags: ['auto'], name: 'b0', granularity: 65536 }, { flags: [], name: 'b1', granularity: 65536 }]);
  });

  it('a bitmaps extension left stale by a program without bitmap support is ignored, and dropped on a read-write open', async () => {
    const f = fresh();
    ok('qemu-img', ['bitmap', '--add', f, 'b0']);
    // Clear autoclear bit 0 (header byte 95), as a writer that does not know bitmaps does.
    const buf = readFileSync(f);
    buf[95] = buf[95]! & ~1;
    writeFileSync(f, buf);
    await withImage(f, true, async (img) => expect(await img.bitmaps.info()).toEqual([]));
    await withImage(f, false, async (img) => img.write(0, new Uint8Array(512)));
    expect(ok('qemu-img', ['info', f])).not.toMatch(/bitmaps:/);
    // Its clusters leaked, as QEMU says they do; a repair takes them back.
    checkClean(f, true);
    ok('qemu-img', ['check', '-r', 'leaks', f]);
    checkClean(f);
  });

  it('snapshots keep the bitmap clusters counted; applying one marks everything; resize grows the bits', async () => {
    const f = fresh();
    await withImage(f, false, async (img) => {
      await img.bitmaps.add('b0');
      await img.write(0, new Uint8Array(4096).fill(1));
      await img.snapshots.create('s1');
      await img.bitmaps.add('b1');
      await img.snapshots.create('s2');
      await img.snapshots.delete('s2');
      expect(asPairs(await img.bitmaps.dirtyExtents('b1'))).toEqual([]);
      await img.snapshots.apply('s1');
      expect(asPairs(await img.bitmaps.dirtyExtents('b1'))).toEqual([[0, 16 * MiB]]);
      await img.bitmaps.clear('b1');
      await img.resize(20 * MiB);
      await img.write(19 * MiB, new Uint8Array(512).fill(3));
      expect(asPairs(await img.bitmaps.dirtyExtents('b1'))).toEqual([[19 * MiB, 65536]]);
    });
    checkClean(f);
    expect(qemuDirty(f, 'b1')).toEqual([[19 * MiB, 65536]]);
    expect(run('qemu-img', ['snapshot', '-l', f]).stdout).toMatch(/s1/);
  });

  it('a crash after a resize leaves an in-use bitmap of the old size: the image still opens, qemu-img agrees', async () => {
    const f = fresh(MiB);
    ok('qemu-img', ['bitmap', '--add', f, 'b0']);
    await killedAfter(t.dir, f, `await img.resize(${8 * 1024 * 1024 * 1024});`);
    expect(qemuInfoBitmaps(f)).toEqual([{ flags: ['in-use', 'auto'], name: 'b0', granularity: 65536 }]);
    await withImage(f, true, async (img) => {
      expect(img.virtualSize).toBe(8 * 1024 * MiB);
      expect((await img.bitmaps.info())[0]!.inconsistent).toBe(true);
    });
    await withImage(f, false, (img) => img.bitmaps.remove('b0'));
    checkClean(f, true);
  });

  it('refuses what QEMU refuses: bitmaps in a v2 (compat=0.10) image, or in an empty one', async () => {
    const v2 = join(t.dir, 'v2.qcow2');
    ok('qemu-img', ['create', '-f', 'qcow2', '-o', 'compat=0.10', v2, '1M']);
    await withImage(v2, false, async (img) => expect(img.bitmaps.add('b')).rejects.toMatchObject({ code: 'Unsupported', message: expect.stringMatching(/v2/) }));
    const empty = fresh(0);
    await withImage(empty, false, async (img) => expect(img.bitmaps.add('b')).rejects.toMatchObject({ code: 'InvalidArgument' }));
    ok('qemu-img', ['info', v2]);
    ok('qemu-img', ['info', empty]);
  });

  it('raw images have no bitmaps: listing is empty, changing is Unsupported', async () => {
    const f = join(t.dir, 'r.raw');
    await createImage(f, { format: 'raw', size: MiB });
    await withImage(f, false, async (img) => {
      expect(await img.bitmaps.info()).toEqual([]);
      await expect(img.bitmaps.add('b')).rejects.toMatchObject({ code: 'Unsupported' });
    });
  });

  /*
   * kill -9 a writer that opens, writes (marking), changes bitmaps and closes, over and over.
   * After each kill: qemu-img check finds no corruption (leaks at most, from a store cut short),
   * and each bitmap is either reported inconsistent (by us and by qemu-img) or holds every write
   * acknowledged while it was enabled since its last clear.
   */
  it(`kill -9 during writes with bitmaps enabled (${KILLS} kills): never a missed write`, async () => {
    const f = fresh();
    let consistentSeen = 0;
    let inconsistentSeen = 0;
    for (let k = 0; k < KILLS; k++) {
      // Start each round with two fresh bitmaps, made by qemu-img or by us in turn.
      await withImage(f, false, async (img) => {
        for (const b of await img.bitmaps.info()) await img.bitmaps.remove(b.name);
      });
      if (k % 2 === 0) {
        ok('qemu-img', ['bitmap', '--add', f, 'b0']);
        ok('qemu-img', ['bitmap', '--add', '-g', '4096', f, 'b1']);
      } else {
        await withImage(f, false, async (img) => {
          await img.bitmaps.add('b0');
          await img.bitmaps.add('b1', { granularity: 4096 });
        });
      }
      // Every third round between two sessions (on its first CLOSED, in a pause the writer makes):
      // at a fixed delay, a machine under load put all the kills inside sessions once.
      const log = await runKilled(f, k + 1, k % 3 === 2 ? 'between' : 40 + ((k * 37) % 400));
      const c = qemuCheckJson(f);
      expect(c.json['corruptions'] ?? 0, `kill ${k}: ${JSON.stringify(c.json)}`).toBe(0);
      const qemuFlags = new Map((qemuInfoBitmaps(f) as { name: string; flags: string[] }[]).map((b) => [b.name, b.flags]));
      await withImage(f, true, async (img) => {
        for (const b of await img.bitmaps.info()) {
          expect(qemuFlags.get(b.name)?.includes('in-use')).toBe(b.inconsistent);
          if (b.inconsistent) { inconsistentSeen++; continue; }
          consistentSeen++;
          const dirty = await img.bitmaps.dirtyExtents(b.name);
          for (const w of expectedWrites(log, b.name)) {
            expect(covered(dirty, w.off, w.len), `kill ${k}: bitmap ${b.name} misses the acknowledged write ${w.off}+${w.len}`).toBe(true);
          }
        }
      });
    }
    // Both outcomes happened: the test saw kills inside a session and between them.
    expect(inconsistentSeen).toBeGreaterThan(0);
    expect(consistentSeen).toBeGreaterThan(0);
  }, 300_000);
});

interface Op { kind: string; off?: number; len?: number; name?: string }

/** Acknowledged writes each bitmap must hold: those while it was enabled, since its last clear. */
function expectedWrites(log: Op[], name: string): { off: number; len: number }[] {
  let enabled = true;
  let out: { off: number; len: number }[] = [];
  for (const op of log) {
    if (op.kind === 'write' && enabled) out.push({ off: op.off!, len: op.len! });
    else if (op.name === name && op.kind === 'clear') out = [];
    else if (op.name === name && op.kind === 'disable') enabled = false;
    else if (op.name === name && op.kind === 'enable') enabled = true;
  }
  return out;
}

function covered(dirty: ByteRange[], off: number, len: number): boolean {
  let pos = off;
  for (const d of dirty) {
    if (d.offset > pos) break;
    if (d.offset + d.length > pos) pos = d.offset + d.length;
    if (pos >= off + len) return true;
  }
  return pos >= off + len;
}

function runKilled(file: string, seed: number, killAfter: number | 'between'): Promise<Op[]> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...tsChild(join(here, 'bitmap-writer.ts')), file, String(seed)],
      { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...(killAfter === 'between' ? { BETWEEN_MS: '2000' } : {}) } });
    let out = '';
    let err = '';
    let timer: NodeJS.Timeout | undefined;
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (killAfter === 'between') {
        if (out.includes('CLOSED')) child.kill('SIGKILL');
      } else if (!timer && out.includes('READY')) timer = setTimeout(() => child.kill('SIGKILL'), killAfter);
    });
    child.stderr.on('data', (d: Buffer) => { err += d.toString(); });
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      if (timer) clearTimeout(timer);
      if (signal !== 'SIGKILL') return reject(new Error(`writer exited ${code}: ${err}`));
      resolve([...out.matchAll(/^ACK (.*)$/gm)].map((m) => JSON.parse(m[1]!) as Op));
    });
  });
}
