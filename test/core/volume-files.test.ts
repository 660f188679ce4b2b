/**
 * `volumes.exportTo` and `volumes.importFrom` between volumes (the memory backend and a local
 * qcow2 pool) and raw and qcow2 files, judged by qemu-img: `compare` against a raw dump of the
 * volume, `check` clean, `map` showing holes where the volume has no data. Then snapshots, every
 * bad input (typed), tenants, locks and cancel, and core's own raw format without any plugin.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, realpathSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createBroker, silentLogger, tenant, type BlockDevice, type Broker, type FileFormat } from '../../core/index.js';
import { FileFormats } from '../../core/broker/file-formats.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';
import { memoryModule } from '../support/memory-backend.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const HAVE_QEMU = spawnSync('qemu-img', ['--version']).status === 0 && spawnSync('qemu-io', ['--version']).status === 0;
if (!HAVE_QEMU) process.stderr.write('\n*** qemu-img/qemu-io not found: the export/import checks with qemu are SKIPPED (install qemu-utils) ***\n\n');

const root = mkdtempSync(join(tmpdir(), 'offload-volume-files-'));
const files = join(root, 'files');
const pool = join(root, 'pool');
mkdirSync(files);
mkdirSync(pool);
let broker: Broker;

beforeAll(async () => {
  broker = await createBroker(
    { state: join(root, 'state'), backends: [{ name: 'mem', kind: 'memory' }, { name: 'local', kind: 'qcow2', path: pool }] },
    { plugins: [qcow2Module, memoryModule], logger: silentLogger },
  );
  for (const be of ['mem', 'local']) await filled(`${be}/src`);
});
afterAll(async () => {
  await broker?.close();
  rmSync(root, { recursive: true, force: true });
});

const pattern = (seed: number, len: number) => Uint8Array.from({ length: len }, (_, i) => (seed * 31 + i * 7 + (i >> 9)) & 0xff);

/** Where the source volumes hold data: 1 MiB at 1 MiB, 4 KiB at 40 MiB, the last MiB; and 64 KiB of written zeros at 20 MiB. */
const DATA = [[1 * MiB, MiB], [40 * MiB, 4096], [63 * MiB, MiB]] as const;

async function withDevice<T>(ref: string, mode: 'r' | 'rw', fn: (d: BlockDevice) => Promise<T>): Promise<T> {
  const d = await broker.volumes.open(ref, mode);
  try {
    return await fn(d);
  } finally {
    await d.close();
  }
}

async function filled(ref: string, size = SIZE): Promise<void> {
  await broker.volumes.create(ref, { sizeBytes: size });
  await withDevice(ref, 'rw', async (d) => {
    for (const [i, [off, len]] of DATA.entries()) if (off + len <= size) await d.write(off, pattern(i + 1, len));
    await d.write(20 * MiB % size, new Uint8Array(64 * 1024));
  });
}

let dumps = 0;
/** Every byte of a volume, in a plain (not sparse) file. */
async function dump(ref: string): Promise<string> {
  const path = join(files, `dump-${dumps++}.bin`);
  await withDevice(ref, 'r', async (d) => writeFileSync(path, await d.read(0, d.sizeBytes)));
  return path;
}

function qemu(tool: 'qemu-img' | 'qemu-io', ...args: string[]): { status: number; out: string } {
  const r = spawnSync(tool, args, { encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } });
  return { status: r.status ?? -1, out: `${r.stdout}${r.stderr}` };
}

/** [start, end) of the ranges `qemu-img map` says hold data. */
function dataRanges(file: string, format: string): [number, number][] {
  const map = JSON.parse(qemu('qemu-img', 'map', '--output=json', '-f', format, file).out) as { start: number; length: number; data: boolean }[];
  return map.filter((m) => m.data).map((m) => [m.start, m.start + m.length]);
}

const overlaps = (ranges: [number, number][], from: number, to: number) => ranges.some(([s, e]) => s < to && e > from);

describe.skipIf(!HAVE_QEMU)('volume export', () => {
  it.each([['mem', 'raw'], ['mem', 'qcow2'], ['local', 'raw'], ['local', 'qcow2']])('%s → %s: sized as the volume, data only, identical to it for qemu-img', async (be, format) => {
    const file = join(files, `${be}-src.${format}`);
    const job = await broker.volumes.exportTo(`${be}/src`, file, { format });
    const info = await job.result();
    expect(info).toMatchObject({ type: 'export', executor: 'host', ref: `${be}/src`, status: 'concluded', params: { source: `${be}/src`, file, format } });
    expect(info.progress.current).toBe(info.progress.total);
    expect(info.progress.total).toBeLessThanOrEqual(2 * MiB + 64 * 1024 + 64 * 1024);
    expect((await broker.jobs.list()).map((j) => j.id)).toContain(job.id);

    const about = JSON.parse(qemu('qemu-img', 'info', '--output=json', file).out) as { format: string; 'virtual-size': number };
    expect(about).toMatchObject({ format, 'virtual-size': SIZE });
    if (format === 'raw') {
      expect(statSync(file).size).toBe(SIZE);
      expect(statSync(file).blocks * 512).toBeLessThan(4 * MiB); // sparse: 2 MiB of data in a 64 MiB file
    } else {
      expect(qemu('qemu-img', 'check', file)).toMatchObject({ status: 0 });
    }
    const data = dataRanges(file, format);
    for (const [off, len] of DATA) expect(overlaps(data, off, off + len), `data at ${off}`).toBe(true);
    // Holes stay holes, and written zeros (at 20 MiB) are not data in the file.
    expect(overlaps(data, 0, MiB) || overlaps(data, 3 * MiB, 40 * MiB) || overlaps(data, 41 * MiB, 63 * MiB)).toBe(false);
    expect(qemu('qemu-img', 'compare', '-f', 'raw', '-F', format, await dump(`${be}/src`), file)).toEqual({ status: 0, out: 'Images are identical.\n' });
  });

  it('exports a snapshot of a pool volume as it was when taken; a backend that cannot read snapshots is Unsupported', async () => {
    await filled('local/snapped', 16 * MiB);
    const before = await dump('local/snapped');
    await broker.snapshots.create('local/snapped@s1');
    await withDevice('local/snapped', 'rw', (d) => d.write(MiB, pattern(9, MiB)));
    const file = join(files, 'snapped-s1.qcow2');
    const info = await (await broker.volumes.exportTo('local/snapped@s1', file, { format: 'qcow2' })).result();
    expect(info).toMatchObject({ ref: 'local/snapped@s1', params: { source: 'local/snapped@s1' } });
    expect(qemu('qemu-img', 'compare', '-f', 'raw', '-F', 'qcow2', before, file).status).toBe(0);
    expect(qemu('qemu-img', 'compare', '-F', 'qcow2', await dump('local/snapped'), file).status).toBe(1);

    await broker.snapshots.create('mem/src@s1');
    await expect(broker.volumes.exportTo('mem/src@s1', join(files, 'mem-s1.raw'))).rejects.toMatchObject({ code: 'Unsupported' });
    await expect(broker.volumes.exportTo('local/snapped@nope', join(files, 'nope.raw'))).rejects.toMatchObject({ code: 'NotFound' });
    expect(existsSync(join(files, 'mem-s1.raw'))).toBe(false);
  });

  it('replaces an existing file only when asked (overwrite), and takes a relative path against the working folder', async () => {
    const file = join(files, 'again.raw');
    writeFileSync(file, 'not an image');
    await expect(broker.volumes.exportTo('mem/src', file)).rejects.toMatchObject({ code: 'AlreadyExists', ref: file });
    expect(readFileSync(file, 'utf8')).toBe('not an image');
    await (await broker.volumes.exportTo('mem/src', file, { overwrite: true, verify: true })).result();
    expect(statSync(file).size).toBe(SIZE);

    const cwd = process.cwd();
    process.chdir(files);
    try {
      const info = await (await broker.volumes.exportTo('mem/src', 'relative.qcow2', { format: 'qcow2' })).result();
      expect(info.params.file).toBe(join(realpathSync(files), 'relative.qcow2'));
    } finally {
      process.chdir(cwd);
    }
    expect(qemu('qemu-img', 'compare', file, join(files, 'relative.qcow2')).status).toBe(0);
  });
});

/** A `format` image of 32 MiB made by qemu-img and written by qemu-io: 1 MiB at 2 MiB, 64 KiB at 30 MiB. */
function qemuMade(name: string, format: string): string {
  const file = join(files, name);
  expect(qemu('qemu-img', 'create', '-f', format, file, '32M').status).toBe(0);
  expect(qemu('qemu-io', '-f', format, '-c', 'write -P 0x5a 2M 1M', '-c', 'write -P 0xa5 30M 64k', file).status).toBe(0);
  return file;
}

describe.skipIf(!HAVE_QEMU)('volume import', () => {
  it.each([['raw', 'mem'], ['qcow2', 'mem'], ['raw', 'local'], ['qcow2', 'local']])('a %s file into an existing %s volume: the volume reads as the file (zeros over its holes), the rest as it was', async (format, be) => {
    const file = qemuMade(`made-${format}-${be}.${format}`, format);
    const ref = `${be}/imp-${format}`;
    await broker.volumes.create(ref, { sizeBytes: SIZE });
    const junk = new Uint8Array(MiB).fill(0xee);
    await withDevice(ref, 'rw', async (d) => {
      for (const off of [0, 3 * MiB, 30 * MiB, 40 * MiB]) await d.write(off, junk);
    });
    const info = await (await broker.volumes.importFrom(file, ref)).result(); // format probed
    expect(info).toMatchObject({ type: 'import', executor: 'host', ref, params: { file, format, target: ref } });
    expect(info.params.create).toBeUndefined();

    const flat = join(files, `flat-${format}-${be}.raw`);
    expect(qemu('qemu-img', 'convert', '-O', 'raw', file, flat).status).toBe(0);
    const want = readFileSync(flat);
    const got = await withDevice(ref, 'r', (d) => d.read(0, SIZE));
    expect(Buffer.from(got.subarray(0, 32 * MiB)).equals(want)).toBe(true);
    expect(got.subarray(40 * MiB, 41 * MiB).every((b) => b === 0xee)).toBe(true); // past the file's end: left as it was
  });

  it('--create makes the volume with the file\'s virtual size, as sparse as the file; a volume that is there is imported into', async () => {
    const file = qemuMade('for-create.qcow2', 'qcow2');
    const info = await (await broker.volumes.importFrom(file, 'local/created', { create: true, verify: true })).result();
    expect(info.params).toMatchObject({ create: { sizeBytes: 32 * MiB, owner: 'admin' } });
    expect(info.plan).toMatchObject({ steps: [{ action: 'volume.create' }, { action: 'data.copy', executor: 'host' }] });
    const vol = await broker.volumes.get('local/created');
    expect(vol).toMatchObject({ sizeBytes: 32 * MiB, owner: 'admin' });
    expect(vol.allocatedBytes).toBeLessThan(2 * MiB);
    const out = join(files, 'created-back.qcow2');
    await (await broker.volumes.exportTo('local/created', out, { format: 'qcow2' })).result();
    expect(qemu('qemu-img', 'compare', file, out).status).toBe(0);
    // Again with create: the volume is ours and there, so the file is copied into it.
    const again = await (await broker.volumes.importFrom(file, 'local/created', { create: true })).result();
    expect(again.params.create).toBeUndefined();
  });

  it('a qcow2 file is imported with its backing chain, as qemu-img convert reads it', async () => {
    const base = qemuMade('chain-base.qcow2', 'qcow2');
    const top = join(files, 'chain-top.qcow2');
    expect(qemu('qemu-img', 'create', '-f', 'qcow2', '-b', 'chain-base.qcow2', '-F', 'qcow2', top).status).toBe(0);
    expect(qemu('qemu-io', '-c', 'write -P 0x33 2M 64k', top).status).toBe(0);
    await (await broker.volumes.importFrom(top, 'mem/chained', { create: true })).result();
    const got = Buffer.from(await withDevice('mem/chained', 'r', (d) => d.read(0, 32 * MiB)));
    const flat = join(files, 'chain-flat.raw');
    expect(qemu('qemu-img', 'convert', '-O', 'raw', top, flat).status).toBe(0);
    expect(got.equals(readFileSync(flat))).toBe(true);
    expect(got[2 * MiB + 64 * 1024]).toBe(0x5a); // from the base
    expect(existsSync(base)).toBe(true);
  });

  it('a file larger than the volume is OutOfRange; a missing volume NotFound unless created', async () => {
    const file = qemuMade('big.raw', 'raw');
    await broker.volumes.create('mem/small', { sizeBytes: 16 * MiB });
    await expect(broker.volumes.importFrom(file, 'mem/small')).rejects.toMatchObject({ code: 'OutOfRange', ref: 'mem/small', message: expect.stringMatching(/33554432 bytes\) is larger than mem\/small \(16777216 bytes\)/) });
    await expect(broker.volumes.importFrom(file, 'mem/ghost')).rejects.toMatchObject({ code: 'NotFound', hint: expect.stringMatching(/--create/) });
  });
});

describe('bad input is refused with a typed error before anything runs', () => {
  it('files, formats, refs and options', async () => {
    const raw = join(files, 'bad-input.raw');
    writeFileSync(raw, Buffer.alloc(MiB));
    // A qcow2 header whose L1 table offset is not cluster aligned (qemu-img: "Active L1 table offset invalid").
    const corrupt = join(files, 'corrupt.qcow2');
    const header = Buffer.alloc(512);
    header.write('QFI\xfb', 0, 'latin1');
    header.writeUInt32BE(3, 4); // version
    header.writeUInt32BE(16, 20); // 64 KiB clusters
    header.writeBigUInt64BE(BigInt(MiB), 24); // size
    header.writeUInt32BE(1, 36); // L1 entries
    header.writeBigUInt64BE(0x12345n, 40); // L1 table offset
    header.writeBigUInt64BE(0x10000n, 48); // refcount table offset
    header.writeUInt32BE(1, 56); // its clusters
    header.writeUInt32BE(4, 96); // refcount order
    header.writeUInt32BE(104, 100); // header length
    writeFileSync(corrupt, header);
    const cases: [() => Promise<unknown>, string][] = [
      [() => broker.volumes.exportTo('mem/src', join(files, 'x.vmdk'), { format: 'vmdk' }), 'InvalidArgument'],
      [() => broker.volumes.exportTo('mem/src', files), 'InvalidArgument'], // a directory
      [() => broker.volumes.exportTo('mem/src', join(root, 'no-such-folder', 'x.raw')), 'NotFound'],
      [() => broker.volumes.exportTo('mem/src', ''), 'InvalidArgument'],
      [() => broker.volumes.exportTo('mem/ghost', join(files, 'ghost.raw')), 'NotFound'],
      [() => broker.volumes.exportTo('mem/bad name', join(files, 'bad.raw')), 'InvalidArgument'],
      [() => broker.volumes.exportTo('nowhere/src', join(files, 'nowhere.raw')), 'NotFound'],
      [() => broker.volumes.exportTo('mem/src', join(files, 'speed.raw'), { speed: -1 }), 'InvalidArgument'],
      [() => broker.volumes.exportTo('local/src', join(pool, 'inside.raw')), 'InvalidArgument'], // the pool's folder
      [() => broker.volumes.importFrom(join(files, 'missing.raw'), 'mem/src'), 'NotFound'],
      [() => broker.volumes.importFrom(files, 'mem/src'), 'InvalidArgument'],
      [() => broker.volumes.importFrom(raw, 'mem/src', { format: 'vhdx' }), 'InvalidArgument'],
      [() => broker.volumes.importFrom(raw, 'mem/src@snap'), 'InvalidArgument'],
      [() => broker.volumes.importFrom(raw, 'mem/src', { owner: 'alice' }), 'InvalidArgument'], // an owner without create
      [() => broker.volumes.importFrom(corrupt, 'mem/src'), 'Corrupt'],
      [() => broker.volumes.importFrom(raw, 'mem/src', { format: 'qcow2' }), 'Corrupt'], // not a qcow2 image
      [() => broker.volumes.importFrom('/dev/null', 'mem/src'), 'InvalidArgument'], // not a regular file
    ];
    for (const [call, code] of cases) await expect(call(), String(call)).rejects.toMatchObject({ code });
    for (const f of ['x.vmdk', 'ghost.raw', 'bad.raw', 'nowhere.raw', 'speed.raw']) expect(existsSync(join(files, f)), f).toBe(false);
    expect(existsSync(join(pool, 'inside.raw'))).toBe(false);
    expect((await broker.jobs.list()).filter((j) => j.error)).toEqual([]);
  });

  it.skipIf(process.getuid?.() === 0)('an unreadable file or an unwritable folder is PermissionDenied', async () => {
    const locked = join(files, 'locked');
    mkdirSync(locked);
    const secret = join(files, 'secret.raw');
    writeFileSync(secret, Buffer.alloc(4096));
    chmodSync(secret, 0o000);
    chmodSync(locked, 0o500);
    await expect(broker.volumes.importFrom(secret, 'mem/src')).rejects.toMatchObject({ code: 'PermissionDenied' });
    await expect(broker.volumes.exportTo('mem/src', join(locked, 'x.raw'))).rejects.toMatchObject({ code: 'PermissionDenied' });
  });
});

describe('tenants export and import their own volumes only', () => {
  it('another tenant\'s volume does not exist for it; --create does not take a name that is taken', async () => {
    const alice = broker.as(tenant('alice'));
    const bob = broker.as(tenant('bob'));
    await alice.volumes.create('mem/alice1', { sizeBytes: 4 * MiB });
    await withDevice('mem/alice1', 'rw', (d) => d.write(0, pattern(3, 4096)));
    const file = join(files, 'alice1.raw');
    const job = await alice.volumes.exportTo('mem/alice1', file);
    await job.result();
    expect(job.info().owner).toBe('alice');
    expect((await bob.jobs.list()).map((j) => j.id)).not.toContain(job.id);

    await expect(bob.volumes.exportTo('mem/alice1', join(files, 'stolen.raw'))).rejects.toMatchObject({ code: 'NotFound' });
    await expect(bob.volumes.importFrom(file, 'mem/alice1')).rejects.toMatchObject({ code: 'NotFound' });
    await expect(bob.volumes.importFrom(file, 'mem/alice1', { create: true })).rejects.toMatchObject({ code: 'AlreadyExists' });
    await expect(bob.volumes.importFrom(file, 'mem/bob1', { create: true, owner: 'alice' })).rejects.toMatchObject({ code: 'PermissionDenied' });
    expect(existsSync(join(files, 'stolen.raw'))).toBe(false);

    await (await bob.volumes.importFrom(file, 'mem/bob1', { create: true })).result();
    expect(await bob.volumes.get('mem/bob1')).toMatchObject({ owner: 'bob', sizeBytes: 4 * MiB });
    await (await alice.volumes.importFrom(file, 'mem/alice1')).result();
    expect(Buffer.from(await withDevice('mem/bob1', 'r', (d) => d.read(0, 4096))).equals(pattern(3, 4096))).toBe(true);
  });
});

describe('locks, cancel', () => {
  const small = join(files, 'small.raw');
  beforeAll(() => writeFileSync(small, pattern(4, MiB)));

  it('an export holds a shared lock on its volume and an exclusive one on its file; cancelled, it removes the file', async () => {
    await filled('local/busy', 32 * MiB);
    const file = join(files, 'busy.qcow2');
    const job = await broker.volumes.exportTo('local/busy', file, { format: 'qcow2', speed: 256 * 1024 });
    await expect(broker.volumes.delete('local/busy')).rejects.toMatchObject({ code: 'Busy' });
    await expect(broker.volumes.importFrom(small, 'local/busy')).rejects.toMatchObject({ code: 'Busy' });
    await expect(broker.volumes.exportTo('local/src', file, { overwrite: true })).rejects.toMatchObject({ code: 'Busy' });
    await expect(broker.volumes.importFrom(file, 'mem/src')).rejects.toMatchObject({ code: 'Busy' });
    const other = await broker.volumes.exportTo('local/busy', join(files, 'busy-too.raw')); // two readers are fine
    await other.result();
    expect((await broker.locks.list()).map((l) => [l.key, l.mode])).toEqual(expect.arrayContaining([['local/busy', 'shared'], [`file:${realpathSync(files)}/busy.qcow2`, 'exclusive']]));
    await job.cancel();
    const info = await job.wait();
    expect(info.error?.code).toBe('Cancelled');
    expect(existsSync(file)).toBe(false);
    expect(existsSync(join(files, 'busy-too.raw'))).toBe(true);
  });

  it('an import holds an exclusive lock on its volume; one that created its volume removes it when cancelled', async () => {
    const file = join(files, 'slow.raw');
    writeFileSync(file, pattern(5, 8 * MiB));
    const job = await broker.volumes.importFrom(file, 'local/fresh', { create: true, speed: 256 * 1024 });
    await expect(broker.volumes.importFrom(file, 'local/fresh', { create: true })).rejects.toMatchObject({ code: 'Busy' });
    while (job.info().progress.current === 0) await new Promise((r) => setTimeout(r, 10));
    await expect(broker.volumes.exportTo('local/fresh', join(files, 'fresh.raw'))).rejects.toMatchObject({ code: 'Busy' });
    await expect(broker.volumes.importFrom(small, 'local/fresh')).rejects.toMatchObject({ code: 'Busy' });
    await job.cancel();
    expect((await job.wait()).error?.code).toBe('Cancelled');
    await expect(broker.volumes.get('local/fresh')).rejects.toMatchObject({ code: 'NotFound' });
  });
});

describe('formats', () => {
  it('a plugin\'s format of a name core has replaces core\'s; probing falls back to raw', async () => {
    const mine: FileFormat = { name: 'raw', description: 'mine', create: () => Promise.reject(new Error('x')), open: () => Promise.reject(new Error('x')) };
    const odd: FileFormat = { name: 'odd', description: 'odd', probe: async (p) => p.endsWith('.odd'), create: mine.create, open: mine.open };
    const formats = new FileFormats([mine, odd]);
    expect(formats.get('raw')).toBe(mine);
    expect(formats.names).toEqual(['odd', 'raw']);
    expect(await formats.probe('/x/y.odd')).toBe(odd);
    expect(await formats.probe('/x/y.img')).toBe(mine);
    expect(() => formats.get('qcow2')).toThrow(/unknown image format "qcow2".*/);
    expect(new FileFormats().get('raw').description).toMatch(/raw disk image/);
  });

  it('core\'s raw alone (no plugin): an export stays sparse, an import reads it back', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'offload-core-raw-'));
    const b = await createBroker({ state: join(dir, 'state'), backends: [{ name: 'm', kind: 'memory' }] }, { plugins: [memoryModule], logger: silentLogger });
    try {
      await b.volumes.create('m/a', { sizeBytes: 16 * MiB });
      const dev = await b.volumes.open('m/a', 'rw');
      await dev.write(5 * MiB, pattern(7, MiB));
      await dev.write(9 * MiB, new Uint8Array(MiB)); // written zeros: no data in the file
      await dev.close();
      const file = join(dir, 'a.raw');
      await (await b.volumes.exportTo('m/a', file)).result();
      expect(statSync(file).size).toBe(16 * MiB);
      expect(statSync(file).blocks * 512).toBeLessThanOrEqual(MiB + 64 * 1024);
      await expect(b.volumes.exportTo('m/a', join(dir, 'a.qcow2'), { format: 'qcow2' })).rejects.toMatchObject({ code: 'InvalidArgument', hint: 'known formats: raw' });
      await b.volumes.create('m/b', { sizeBytes: 16 * MiB });
      const info = await (await b.volumes.importFrom(file, 'm/b', { verify: true })).result();
      expect(info.params.format).toBe('raw');
      const back = await b.volumes.open('m/b', 'r');
      expect(Buffer.from(await back.read(5 * MiB, MiB)).equals(pattern(7, MiB))).toBe(true);
      await back.close();
    } finally {
      await b.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
