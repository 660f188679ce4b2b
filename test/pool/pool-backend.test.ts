/**
 * The local qcow2 pool through the broker: the snapshot model (external layers), what lands on
 * disk (checked with qemu-img), dependents, merges, stream, commit, and bad input.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createBroker, JobRun, silentLogger } from '../../core/index.js';
import { METADATA_FILE, PoolMetadata } from '../../plugins/qcow2/pool/metadata.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';
import {
  fileBytes, GiB, HAVE_QEMU_IMG, layerFiles, MiB, openPool, pattern, qemuImg, read, write, type PoolFixture,
} from './pool-helpers.js';

let fx: PoolFixture;
beforeEach(async () => { fx = await openPool(); });
afterEach(async () => { await fx.close(); });

const qemuCheckAll = (dir: string) => {
  for (const f of layerFiles(dir)) {
    const r = qemuImg(['check', f], dir);
    expect(r.status, `${f}: ${r.stdout}${r.stderr}`).toBe(0);
  }
};

describe('qcow2 pool: layers on disk', () => {
  it.skipIf(!HAVE_QEMU_IMG)('every file passes qemu-img check and `info --backing-chain` shows the real chain with relative names', async () => {
    const b = fx.broker;
    await b.volumes.create('local/vm', { sizeBytes: 64 * MiB });
    await write(b, 'local/vm', 0, pattern(1, 256 * 1024));
    await b.snapshots.create('local/vm@s1');
    await write(b, 'local/vm', MiB, pattern(2, 128 * 1024));
    await b.snapshots.create('local/vm@s2');
    await b.clone('local/vm@s1', 'local/c1', { mode: 'linked' });
    await write(b, 'local/c1', 2 * MiB, pattern(3, 64 * 1024));
    await b.clone('local/vm@s2', 'local/full', { mode: 'full' });
    qemuCheckAll(fx.dir);

    const files = fx.pool.chainFiles('c1');
    expect(files).toHaveLength(2);
    const info = JSON.parse(qemuImg(['info', '--backing-chain', '--output=json', basename(files[0]!)], fx.dir).stdout) as
      { filename: string; 'backing-filename'?: string }[];
    expect(info.map((i) => basename(i.filename))).toEqual(files.map((f) => basename(f)));
    expect(info[0]!['backing-filename']).toBe(basename(files[1]!)); // relative: the folder can move
    // qemu reads through the chain exactly what the broker reads
    const dump = join(fx.dir, '..', 'c1.raw');
    expect(qemuImg(['convert', '-O', 'raw', basename(files[0]!), dump], fx.dir).status).toBe(0);
    const { readFileSync } = await import('node:fs');
    const raw = readFileSync(dump);
    expect(Buffer.compare(raw.subarray(0, 256 * 1024), Buffer.from(pattern(1, 256 * 1024)))).toBe(0);
    expect(Buffer.compare(raw.subarray(2 * MiB, 2 * MiB + 64 * 1024), Buffer.from(pattern(3, 64 * 1024)))).toBe(0);
    expect(raw.subarray(MiB, MiB + 4096).every((x) => x === 0)).toBe(true); // written after s1
    expect(fx.pool.chainFiles('full')).toHaveLength(1);
  });

  it('a linked clone of a 16 GiB volume writes a few KiB, whatever the data', async () => {
    const b = fx.broker;
    await b.volumes.create('local/big', { sizeBytes: 16 * GiB });
    await write(b, 'local/big', 8 * GiB, pattern(5, 4 * MiB));
    await b.snapshots.create('local/big@base');
    const before = new Set(layerFiles(fx.dir));
    await b.clone('local/big@base', 'local/bigclone', { mode: 'linked' });
    const added = layerFiles(fx.dir).filter((f) => !before.has(f));
    expect(added).toHaveLength(1);
    const bytes = fileBytes(join(fx.dir, added[0]!));
    // A fresh overlay: header, refcount table and block, L1 (16 GiB / 512 MiB per L2 = 32 entries).
    expect(bytes.size).toBeLessThanOrEqual(256 * 1024);
    expect(bytes.allocated).toBeLessThanOrEqual(256 * 1024);
    expect(Buffer.compare(await read(b, 'local/bigclone', 8 * GiB, 4 * MiB), Buffer.from(pattern(5, 4 * MiB)))).toBe(0);
    // a linked clone of the volume itself is as cheap: two overlays on its frozen top
    const before2 = new Set(layerFiles(fx.dir));
    await b.clone('local/big', 'local/bigclone2', { mode: 'linked' });
    const added2 = layerFiles(fx.dir).filter((f) => !before2.has(f));
    expect(added2).toHaveLength(2);
    for (const f of added2) expect(fileBytes(join(fx.dir, f)).size).toBeLessThanOrEqual(256 * 1024);
    expect((await b.volumes.get('local/bigclone2')).parent).toBe('local/big');
  });

  it('a full clone owns its data and is sparse', async () => {
    const b = fx.broker;
    await b.volumes.create('local/src', { sizeBytes: 4 * GiB });
    await write(b, 'local/src', GiB, pattern(6, MiB));
    await b.clone('local/src', 'local/copy', { mode: 'full', sizeBytes: 8 * GiB });
    const [file] = fx.pool.chainFiles('copy');
    expect(fx.pool.chainFiles('copy')).toHaveLength(1);
    expect(fileBytes(file!).allocated).toBeLessThan(4 * MiB);
    expect((await b.volumes.get('local/copy')).sizeBytes).toBe(8 * GiB);
    await b.volumes.delete('local/src'); // nothing depends on it
    expect(Buffer.compare(await read(b, 'local/copy', GiB, MiB), Buffer.from(pattern(6, MiB)))).toBe(0);
  });
});

describe('qcow2 pool: snapshots, reverts and dependents', () => {
  it('revert adds one empty overlay and drops the discarded top', async () => {
    const b = fx.broker;
    await b.volumes.create('local/v', { sizeBytes: 32 * MiB });
    await write(b, 'local/v', 0, pattern(1, 65536));
    await b.snapshots.create('local/v@good');
    await write(b, 'local/v', 0, pattern(2, 4 * MiB));
    const discarded = fx.pool.chainFiles('v')[0]!;
    await b.snapshots.revert('local/v@good');
    const chain = fx.pool.chainFiles('v');
    expect(chain).toHaveLength(2);
    expect(chain).not.toContain(discarded);
    expect(layerFiles(fx.dir)).not.toContain(basename(discarded));
    expect(fileBytes(chain[0]!).size).toBeLessThanOrEqual(256 * 1024);
    expect(Buffer.compare(await read(b, 'local/v', 0, 65536), Buffer.from(pattern(1, 65536)))).toBe(0);
  });

  it('a device stays valid across a snapshot: later writes land in the new top, the snapshot keeps the old data', async () => {
    const b = fx.broker;
    await b.volumes.create('local/live', { sizeBytes: 32 * MiB });
    const dev = await b.volumes.open('local/live', 'rw');
    try {
      await dev.write(0, pattern(1, 8192));
      await b.snapshots.create('local/live@t1');
      await dev.write(0, pattern(2, 8192));
      expect(Buffer.compare(Buffer.from(await dev.read(0, 8192)), Buffer.from(pattern(2, 8192)))).toBe(0);
      await b.clone('local/live@t1', 'local/at-t1', { mode: 'linked' });
      expect(Buffer.compare(await read(b, 'local/at-t1', 0, 8192), Buffer.from(pattern(1, 8192)))).toBe(0);
      await b.snapshots.revert('local/live@t1');
      expect(Buffer.compare(Buffer.from(await dev.read(0, 8192)), Buffer.from(pattern(1, 8192)))).toBe(0);
    } finally {
      await dev.close();
    }
  });

  it('deleting a volume or snapshot that a clone depends on is refused and changes nothing; after a stream both go', async () => {
    const b = fx.broker;
    await b.volumes.create('local/parent', { sizeBytes: 32 * MiB });
    await write(b, 'local/parent', 0, pattern(9, MiB));
    await b.snapshots.create('local/parent@p');
    await b.clone('local/parent@p', 'local/child', { mode: 'linked' });
    await write(b, 'local/child', 2 * MiB, pattern(10, 65536));
    const files = layerFiles(fx.dir);
    await expect(b.volumes.delete('local/parent')).rejects.toMatchObject({ code: 'FailedPrecondition', message: expect.stringContaining('local/child') });
    await expect(b.snapshots.delete('local/parent@p')).rejects.toMatchObject({ code: 'FailedPrecondition', message: expect.stringContaining('local/child') });
    expect(layerFiles(fx.dir)).toEqual(files);
    expect((await b.snapshots.list('local/parent')).map((s) => s.name)).toEqual(['p']);
    expect((await b.volumes.get('local/child')).parent).toBe('local/parent@p');

    const info = await (await b.stream('local/child')).wait();
    expect(info.status).toBe('concluded');
    expect(info.error).toBeUndefined();
    expect((await b.volumes.get('local/child')).parent).toBeUndefined();
    expect(fx.pool.chainFiles('child')).toHaveLength(1);
    await b.snapshots.delete('local/parent@p');
    await b.volumes.delete('local/parent');
    expect(Buffer.compare(await read(b, 'local/child', 0, MiB), Buffer.from(pattern(9, MiB)))).toBe(0);
    expect(Buffer.compare(await read(b, 'local/child', 2 * MiB, 65536), Buffer.from(pattern(10, 65536)))).toBe(0);
    expect(layerFiles(fx.dir)).toEqual(fx.pool.chainFiles('child').map((f) => basename(f)));
    if (HAVE_QEMU_IMG) qemuCheckAll(fx.dir);
  });

  it('deleting a snapshot in the middle of a chain merges its layer into the one above', async () => {
    const b = fx.broker;
    await b.volumes.create('local/m', { sizeBytes: 32 * MiB });
    await write(b, 'local/m', 0, pattern(1, MiB));
    await b.snapshots.create('local/m@a');
    await write(b, 'local/m', MiB, pattern(2, MiB));
    await b.snapshots.create('local/m@b');
    await write(b, 'local/m', 2 * MiB, pattern(3, MiB));
    await b.clone('local/m@b', 'local/from-b', { mode: 'linked' });
    expect(fx.pool.chainFiles('m')).toHaveLength(3);

    await b.snapshots.delete('local/m@a'); // b's layer takes a's clusters; the clone of b is untouched
    expect(fx.pool.chainFiles('m')).toHaveLength(2);
    expect(fx.pool.chainFiles('from-b')).toHaveLength(2);
    expect((await b.snapshots.list('local/m')).map((s) => s.name)).toEqual(['b']);
    for (const v of ['local/m', 'local/from-b']) {
      expect(Buffer.compare(await read(b, v, 0, MiB), Buffer.from(pattern(1, MiB))), v).toBe(0);
      expect(Buffer.compare(await read(b, v, MiB, MiB), Buffer.from(pattern(2, MiB))), v).toBe(0);
    }
    expect(Buffer.compare(await read(b, 'local/m', 2 * MiB, MiB), Buffer.from(pattern(3, MiB)))).toBe(0);
    expect((await read(b, 'local/from-b', 2 * MiB, MiB)).every((x) => x === 0)).toBe(true);
    expect(layerFiles(fx.dir)).toHaveLength(3); // m's top, b's layer, the clone's overlay
    if (HAVE_QEMU_IMG) qemuCheckAll(fx.dir);
  });

  it('the latest snapshot is merged into a volume that is open and being written', async () => {
    const b = fx.broker;
    await b.volumes.create('local/busy', { sizeBytes: 32 * MiB });
    await write(b, 'local/busy', 0, pattern(1, 2 * MiB));
    await b.snapshots.create('local/busy@x');
    const dev = await b.volumes.open('local/busy', 'rw');
    try {
      await dev.write(MiB, pattern(2, 65536));
      await b.snapshots.delete('local/busy@x');
      await dev.write(3 * MiB, pattern(3, 65536));
      expect(fx.pool.chainFiles('busy')).toHaveLength(1);
      expect(Buffer.compare(Buffer.from(await dev.read(0, MiB)), Buffer.from(pattern(1, MiB)))).toBe(0);
      expect(Buffer.compare(Buffer.from(await dev.read(MiB, 65536)), Buffer.from(pattern(2, 65536)))).toBe(0);
      expect(Buffer.compare(Buffer.from(await dev.read(3 * MiB, 65536)), Buffer.from(pattern(3, 65536)))).toBe(0);
    } finally {
      await dev.close();
    }
    if (HAVE_QEMU_IMG) qemuCheckAll(fx.dir);
  });
});

describe('qcow2 pool: commit', () => {
  it('commits a volume into its latest snapshot when asked by name, and explains every refusal', async () => {
    const b = fx.broker;
    await b.volumes.create('local/c', { sizeBytes: 32 * MiB });
    await write(b, 'local/c', 0, pattern(1, MiB));
    await expect(b.commit('local/c')).rejects.toMatchObject({ code: 'FailedPrecondition', message: expect.stringContaining('no parent layer') });
    await b.snapshots.create('local/c@pre');
    await write(b, 'local/c', MiB, pattern(2, MiB));
    await expect(b.commit('local/c')).rejects.toMatchObject({ code: 'FailedPrecondition', message: expect.stringContaining('local/c@pre') });

    await b.clone('local/c@pre', 'local/k', { mode: 'linked' });
    await expect(b.commit('local/k')).rejects.toMatchObject({ code: 'FailedPrecondition', message: expect.stringContaining('shared') });
    await expect(b.commit('local/c', { base: 'pre' })).rejects.toMatchObject({ code: 'FailedPrecondition', message: expect.stringContaining('also the base of') });
    await b.volumes.delete('local/k');

    const info = await (await b.commit('local/c', { base: 'pre' })).wait();
    expect(info.error).toBeUndefined();
    expect(info.status).toBe('concluded');
    expect(info.executor).toBe('backend:local');
    expect(fx.pool.chainFiles('c')).toHaveLength(1);
    expect(await b.snapshots.list('local/c')).toEqual([]);
    expect(layerFiles(fx.dir)).toHaveLength(1);
    expect(Buffer.compare(await read(b, 'local/c', 0, MiB), Buffer.from(pattern(1, MiB)))).toBe(0);
    expect(Buffer.compare(await read(b, 'local/c', MiB, MiB), Buffer.from(pattern(2, MiB)))).toBe(0);
    if (HAVE_QEMU_IMG) qemuCheckAll(fx.dir);
  });
});

describe('qcow2 pool: bad input', () => {
  it('sizes that are 0, negative, not a number or beyond qcow2 are InvalidArgument, straight to the backend too', async () => {
    const max = (await fx.broker.backends())[0]!.capabilities.limits('volume.create')!.maxSizeBytes!;
    expect(max).toBe(2 ** 51); // 64 KiB clusters: 4 Mi L1 entries × 512 MiB
    for (const bad of [0, -1, Number.NaN, 1.5, Infinity, '1G', max + 512]) {
      await expect(fx.broker.volumes.create('local/bad', { sizeBytes: bad as number }), String(bad)).rejects.toMatchObject({ code: 'InvalidArgument' });
      await expect(fx.pool.createVolume({ name: 'bad', sizeBytes: bad as number }), String(bad)).rejects.toMatchObject({ code: 'InvalidArgument' });
    }
    await expect(fx.pool.resizeVolume('nope', -5)).rejects.toMatchObject({ code: 'InvalidArgument' });
    expect(layerFiles(fx.dir)).toEqual([]);
    const meta = new PoolMetadata(join(fx.dir, METADATA_FILE));
    expect(meta.layers()).toEqual([]);
    meta.close();
  });

  it('a missing pool folder or a file in its place is a one-line error at broker start', async () => {
    const root = mkdtempSync(join(tmpdir(), 'offload-pool-bad-'));
    try {
      const start = (path: string) => createBroker({ state: join(root, 'state'), backends: [{ name: 'local', kind: 'qcow2', path }] }, { plugins: [qcow2Module], logger: silentLogger });
      await expect(start(join(root, 'missing'))).rejects.toThrow(/backend "local" \(qcow2\) cannot start: .*pool folder .*missing does not exist/);
      writeFileSync(join(root, 'afile'), 'x');
      await expect(start(join(root, 'afile'))).rejects.toThrow(/is not a folder/);
      await expect(createBroker({ state: join(root, 'state'), backends: [{ name: 'local', kind: 'qcow2', path: root, clusterSize: 1000 }] }, { plugins: [qcow2Module], logger: silentLogger }))
        .rejects.toThrow(/clusterSize/);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  it('stream and commit of what is not there are NotFound; a base that is not below is NotFound', async () => {
    const b = fx.broker;
    await expect(b.stream('local/ghost')).rejects.toMatchObject({ code: 'NotFound' });
    await expect(b.commit('local/ghost')).rejects.toMatchObject({ code: 'NotFound' });
    await b.volumes.create('local/solo', { sizeBytes: 32 * MiB });
    await expect(b.stream('local/solo', { base: 'nothing' })).rejects.toMatchObject({ code: 'NotFound' });
  });
});

describe('qcow2 pool: stream of a clone that has snapshots of its own', () => {
  it('pulls the source data into the clone\'s lowest layer, keeps its snapshots, and frees the source', async () => {
    const b = fx.broker;
    await b.volumes.create('local/src', { sizeBytes: 32 * MiB });
    await write(b, 'local/src', 0, pattern(1, MiB));
    await b.snapshots.create('local/src@s');
    await b.clone('local/src@s', 'local/c', { mode: 'linked' });
    await write(b, 'local/c', MiB, pattern(2, MiB));
    await b.snapshots.create('local/c@mine');
    await write(b, 'local/c', 2 * MiB, pattern(3, MiB));
    expect(fx.pool.chainFiles('c')).toHaveLength(3);

    const info = await (await b.stream('local/c')).wait();
    expect(info.error).toBeUndefined();
    expect(fx.pool.chainFiles('c')).toHaveLength(2); // its top and its snapshot's layer, nothing of src
    await b.snapshots.delete('local/src@s');
    await b.volumes.delete('local/src');
    await b.clone('local/c@mine', 'local/at-mine', { mode: 'full' });
    expect(Buffer.compare(await read(b, 'local/at-mine', 0, MiB), Buffer.from(pattern(1, MiB)))).toBe(0);
    expect(Buffer.compare(await read(b, 'local/at-mine', MiB, MiB), Buffer.from(pattern(2, MiB)))).toBe(0);
    expect((await read(b, 'local/at-mine', 2 * MiB, MiB)).every((x) => x === 0)).toBe(true);
    expect(Buffer.compare(await read(b, 'local/c', 2 * MiB, MiB), Buffer.from(pattern(3, MiB)))).toBe(0);
    if (HAVE_QEMU_IMG) qemuCheckAll(fx.dir);
  });

  it('resumeTask rebuilds a stream from its stored params, and refuses params it cannot use', async () => {
    const b = fx.broker;
    await b.volumes.create('local/p', { sizeBytes: 32 * MiB });
    await write(b, 'local/p', 0, pattern(7, MiB));
    await b.snapshots.create('local/p@s');
    await b.clone('local/p@s', 'local/r', { mode: 'linked' });
    const made = await fx.pool.streamVolume('r', {});
    const again = await fx.pool.resumeTask(made.type, JSON.parse(JSON.stringify(made.params)) as Record<string, unknown>);
    expect(again).toBeDefined();
    await again!.run(new JobRun({ jobId: 'resumed' }));
    expect((await b.volumes.get('local/r')).parent).toBeUndefined();
    expect(await fx.pool.resumeTask('stream', { volume: 'ghost', target: 'x', base: null })).toBeUndefined();
    expect(await fx.pool.resumeTask('teleport', { volume: 'r' })).toBeUndefined();
    expect(Buffer.compare(await read(b, 'local/r', 0, MiB), Buffer.from(pattern(7, MiB)))).toBe(0);
  });
});
