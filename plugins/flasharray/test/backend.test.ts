import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { isOffloadError } from '../../../core/index.js';
import { startFlashArrayMock, type FlashArrayMock } from '../appliance/index.js';
import type { FlashArrayBackend } from '../backend.js';
import { makeBackend, pattern } from './helpers.js';

const MiB = 1024 * 1024;

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'ok';
  } catch (e) {
    if (isOffloadError(e)) return e.code;
    throw e;
  }
}

describe('flasharray backend against the mock array', () => {
  let mock: FlashArrayMock;
  let be: FlashArrayBackend;

  beforeEach(async () => {
    mock = await startFlashArrayMock({ apiToken: 'secret-token' });
    be = await makeBackend(mock.url, 'secret-token');
  });
  afterEach(async () => {
    await be.close();
    await mock.close();
  });

  it('creates idempotently by name and refuses a different size', async () => {
    const v = await be.createVolume({ name: 'vol1', sizeBytes: 4 * MiB });
    expect(v).toMatchObject({ backend: 'san', name: 'vol1', sizeBytes: 4 * MiB });
    expect(await be.createVolume({ name: 'vol1', sizeBytes: 4 * MiB })).toMatchObject({ name: 'vol1', sizeBytes: 4 * MiB });
    expect(await code(be.createVolume({ name: 'vol1', sizeBytes: 8 * MiB }))).toBe('AlreadyExists');
    expect((await be.listVolumes()).items.map((x) => x.name)).toEqual(['vol1']);
  });

  it('rounds sizes up to whole sectors and refuses names and sizes the array cannot hold', async () => {
    expect((await be.createVolume({ name: 'odd', sizeBytes: 1000 })).sizeBytes).toBe(1024);
    expect(await code(be.createVolume({ name: 'has.dot', sizeBytes: MiB }))).toBe('InvalidArgument');
    expect(await code(be.createVolume({ name: 'x'.repeat(64), sizeBytes: MiB }))).toBe('InvalidArgument');
    expect(await code(be.createVolume({ name: 'zero', sizeBytes: 0 }))).toBe('InvalidArgument');
    expect(await code(be.createVolume({ name: 'huge', sizeBytes: 5 * 1024 ** 5 }))).toBe('OutOfRange');
    expect(await code(be.createVolume({ name: 'nosize' }))).toBe('InvalidArgument');
  });

  it('grows, refuses to shrink, and reports missing volumes', async () => {
    await be.createVolume({ name: 'v', sizeBytes: MiB });
    expect((await be.resizeVolume('v', 2 * MiB)).sizeBytes).toBe(2 * MiB);
    expect((await be.resizeVolume('v', 2 * MiB)).sizeBytes).toBe(2 * MiB);
    expect(await code(be.resizeVolume('v', MiB))).toBe('OutOfRange');
    expect((await be.getVolume('v'))?.sizeBytes).toBe(2 * MiB);
    expect(await code(be.resizeVolume('missing', MiB))).toBe('NotFound');
    expect(await be.getVolume('missing')).toBeUndefined();
  });

  it('deletes by destroy + eradicate; deleting again or a missing volume succeeds; the name is free again', async () => {
    await be.createVolume({ name: 'gone', sizeBytes: MiB });
    await be.deleteVolume('gone');
    expect(await be.getVolume('gone')).toBeUndefined();
    await be.deleteVolume('gone');
    await be.deleteVolume('never-was');
    expect((await be.createVolume({ name: 'gone', sizeBytes: 2 * MiB })).sizeBytes).toBe(2 * MiB);
  });

  it('re-creates over a name still held by a destroyed volume (an interrupted delete)', async () => {
    await be.createVolume({ name: 'half', sizeBytes: MiB });
    const login = await fetch(`${mock.url}/api/2.26/login`, { method: 'POST', headers: { 'api-token': 'secret-token' } });
    const token = login.headers.get('x-auth-token')!;
    const r = await fetch(`${mock.url}/api/2.26/volumes?names=half`, {
      method: 'PATCH', headers: { 'x-auth-token': token, 'content-type': 'application/json' }, body: JSON.stringify({ destroyed: true }),
    });
    expect(r.status).toBe(200);
    expect(await be.getVolume('half')).toBeUndefined();
    expect((await be.createVolume({ name: 'half', sizeBytes: 2 * MiB })).sizeBytes).toBe(2 * MiB);
    // and a delete that finds it destroyed finishes the job
    await fetch(`${mock.url}/api/2.26/volumes?names=half`, {
      method: 'PATCH', headers: { 'x-auth-token': token, 'content-type': 'application/json' }, body: JSON.stringify({ destroyed: true }),
    });
    await be.deleteVolume('half');
    const list = await fetch(`${mock.url}/api/2.26/volumes`, { headers: { 'x-auth-token': token } });
    expect(((await list.json()) as { items: unknown[] }).items).toEqual([]);
  });

  it('snapshots: create (idempotent), list, delete; a volume with snapshots cannot be deleted', async () => {
    await be.createVolume({ name: 'db', sizeBytes: MiB });
    const s = await be.createSnapshot('db', 'daily-1');
    expect(s).toMatchObject({ backend: 'san', volume: 'db', name: 'daily-1', sizeBytes: MiB });
    expect(await be.createSnapshot('db', 'daily-1')).toMatchObject({ name: 'daily-1' });
    await be.createSnapshot('db', 'daily-2');
    expect((await be.listSnapshots('db')).map((x) => x.name)).toEqual(['daily-1', 'daily-2']);
    expect(await code(be.deleteVolume('db'))).toBe('FailedPrecondition');
    expect(await be.getVolume('db')).toBeDefined();
    await be.deleteSnapshot('db', 'daily-1');
    await be.deleteSnapshot('db', 'daily-1');
    await be.deleteSnapshot('db', 'daily-2');
    expect(await be.listSnapshots('db')).toEqual([]);
    await be.deleteVolume('db');
    expect(await code(be.createSnapshot('db', 'x'))).toBe('NotFound');
    expect(await code(be.listSnapshots('db'))).toBe('NotFound');
  });

  it('clones (offloaded copy) from volumes and snapshots, thin and independent', async () => {
    await be.createVolume({ name: 'src', sizeBytes: 2 * MiB });
    const dev = await be.openVolume('src', 'rw');
    const a = pattern(300_000, 1);
    await dev.write(12_345, a);
    await be.createSnapshot('src', 's1');
    await dev.write(12_345, pattern(1000, 2));

    const fromSnap = await be.createVolume({ name: 'from-snap', source: { volume: 'src', snapshot: 's1' }, mode: 'full' });
    expect(fromSnap.sizeBytes).toBe(2 * MiB);
    const c = await be.openVolume('from-snap', 'rw');
    expect(Buffer.from(await c.read(12_345, a.length)).equals(a)).toBe(true);

    const big = await be.createVolume({ name: 'bigger', source: { volume: 'src' }, sizeBytes: 3 * MiB });
    expect(big.sizeBytes).toBe(3 * MiB);
    const b = await be.openVolume('bigger', 'r');
    expect(Buffer.from(await b.read(12_345, 1000)).equals(pattern(1000, 2))).toBe(true);
    // same clone again: idempotent
    expect((await be.createVolume({ name: 'bigger', source: { volume: 'src' }, sizeBytes: 3 * MiB })).sizeBytes).toBe(3 * MiB);
    expect(await code(be.createVolume({ name: 'bigger', source: { volume: 'src', snapshot: 's1' } }))).toBe('AlreadyExists');

    // copy-on-write: writing the clone leaves the source alone
    await c.write(12_345, Buffer.alloc(10, 0xee));
    expect(Buffer.from(await dev.read(12_345, 10)).equals(pattern(1000, 2).subarray(0, 10))).toBe(true);

    expect(await code(be.createVolume({ name: 'small', source: { volume: 'src' }, sizeBytes: MiB }))).toBe('OutOfRange');
    expect(await code(be.createVolume({ name: 'x1', source: { volume: 'nope' } }))).toBe('NotFound');
    expect(await code(be.createVolume({ name: 'x2', source: { volume: 'src', snapshot: 'nope' } }))).toBe('NotFound');
    expect(await code(be.createVolume({ name: 'x3', source: { volume: 'src' }, mode: 'linked' }))).toBe('Unsupported');
    // the source can be deleted: array copies do not depend on it
    await be.deleteSnapshot('src', 's1');
    await be.deleteVolume('src');
    expect(Buffer.from(await c.read(12_345 + 10, 1000)).equals(a.subarray(10, 1010))).toBe(true);
  });

  it('reverts a volume to a snapshot (overwrite), size included', async () => {
    await be.createVolume({ name: 'r', sizeBytes: MiB });
    const dev = await be.openVolume('r', 'rw');
    await dev.write(0, pattern(4096, 3));
    await be.createSnapshot('r', 'before');
    await dev.write(0, pattern(4096, 4));
    await be.resizeVolume('r', 2 * MiB);
    await be.revertVolume('r', 'before');
    expect((await be.getVolume('r'))?.sizeBytes).toBe(MiB);
    const again = await be.openVolume('r', 'r');
    expect(Buffer.from(await again.read(0, 4096)).equals(pattern(4096, 3))).toBe(true);
    expect(await code(be.revertVolume('r', 'nope'))).toBe('NotFound');
    expect(await code(be.revertVolume('nope', 'before'))).toBe('NotFound');
  });

  it('data path: sparse extents, zeroes, bounds and modes', async () => {
    await be.createVolume({ name: 'd', sizeBytes: 4 * MiB });
    const dev = await be.openVolume('d', 'rw');
    expect(await dev.extents()).toEqual([]);
    await dev.write(MiB, pattern(100_000, 5));
    await dev.writeZeroes!(3 * MiB, MiB);
    const ext = await dev.extents();
    expect(ext.filter((e) => e.kind === 'data').every((e) => e.offset <= MiB && e.offset + e.length >= MiB + 100_000)).toBe(true);
    expect(ext).toContainEqual({ offset: 3 * MiB, length: MiB, kind: 'zero' });
    expect(Buffer.from(await dev.read(3 * MiB, 10)).equals(Buffer.alloc(10))).toBe(true);
    expect(Buffer.from(await dev.read(0, 16)).equals(Buffer.alloc(16))).toBe(true);
    expect(await code(dev.read(4 * MiB - 1, 2))).toBe('OutOfRange');
    const ro = await be.openVolume('d', 'r');
    expect(await code(ro.write(0, Buffer.alloc(1)))).toBe('FailedPrecondition');
    await ro.close();
    expect(await code(ro.read(0, 1))).toBe('FailedPrecondition');
    expect(await code(be.openVolume('nope', 'r'))).toBe('NotFound');
    // a write and read larger than one data-plane request (8 MiB) are split
    await be.createVolume({ name: 'large', sizeBytes: 20 * MiB });
    const large = await be.openVolume('large', 'rw');
    const big = pattern(17 * MiB + 3, 6);
    await large.write(512, big);
    expect(Buffer.from(await large.read(512, big.length)).equals(big)).toBe(true);
  });

  it('lists every volume exactly once across pages', async () => {
    const names = Array.from({ length: 7 }, (_, i) => `p${i}`);
    for (const n of names) await be.createVolume({ name: n, sizeBytes: MiB });
    await be.createVolume({ name: 'doomed', sizeBytes: MiB });
    await be.deleteVolume('doomed');
    const seen: string[] = [];
    let token: string | undefined;
    let pages = 0;
    do {
      const p = await be.listVolumes({ limit: 3, token });
      expect(p.items.length).toBeLessThanOrEqual(3);
      seen.push(...p.items.map((v) => v.name));
      token = p.next;
      pages++;
    } while (token);
    expect(seen).toEqual(names);
    expect(pages).toBe(3);
    expect(await code(be.listVolumes({ limit: 2, token: 'garbage' }))).toBe('InvalidArgument');
    expect(await code(be.listVolumes({ limit: 0 }))).toBe('InvalidArgument');
  });
});

describe('flasharray mock persistence', () => {
  it('keeps volumes, snapshots and data in --state across restarts', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'fa-state-'));
    try {
      let mock = await startFlashArrayMock({ apiToken: 't', stateDir: dir });
      let be = await makeBackend(mock.url, 't');
      await be.createVolume({ name: 'keep', sizeBytes: MiB });
      const dev = await be.openVolume('keep', 'rw');
      await dev.write(777, pattern(70_000, 9));
      await be.createSnapshot('keep', 'snap');
      await dev.write(777, Buffer.alloc(100, 1));
      await be.createVolume({ name: 'copy', source: { volume: 'keep', snapshot: 'snap' } });
      await be.close();
      await mock.close();

      mock = await startFlashArrayMock({ apiToken: 't', stateDir: dir });
      be = await makeBackend(mock.url, 't');
      expect((await be.listVolumes()).items.map((v) => v.name)).toEqual(['copy', 'keep']);
      expect((await be.listSnapshots('keep')).map((s) => s.name)).toEqual(['snap']);
      const keep = await be.openVolume('keep', 'r');
      expect(Buffer.from(await keep.read(777, 100)).equals(Buffer.alloc(100, 1))).toBe(true);
      const copy = await be.openVolume('copy', 'r');
      expect(Buffer.from(await copy.read(777, 70_000)).equals(pattern(70_000, 9))).toBe(true);
      await be.deleteSnapshot('keep', 'snap');
      await be.deleteVolume('keep');
      await be.deleteVolume('copy');
      await be.close();
      await mock.close();
      const { readdir } = await import('node:fs/promises');
      expect(await readdir(join(dir, 'chunks'))).toEqual([]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
