/**
 * A snapshot's data through the mock array's data plane (`/data/volumes/vol.suffix`) over plain
 * HTTP — its bytes and extents as taken, whatever the volume does since; writes refused — and
 * the backend's openSnapshot through it: read-only device, typed errors, and faults ridden out.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { isOffloadError, type BlockDevice, type OffloadError } from '../../../core/index.js';
import { Messages } from '../api/messages.js';
import { DataExtents, ErrorEnvelope } from '../api/schemas.js';
import { startFlashArrayMock, type FlashArrayMock } from '../appliance/index.js';
import type { FlashArrayBackend } from '../backend.js';
import { FlashArrayClient } from '../client.js';
import { callMock, fastRetry, makeBackend, pattern } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;

describe('mock FlashArray: a snapshot through the data plane', () => {
  let mock: FlashArrayMock;
  let token: string;

  const call = (method: string, path: string, body?: Uint8Array | object, headers: Record<string, string> = {}) =>
    callMock(mock.url, token, method, path, body, headers);
  const put = (name: string, offset: number, data: Uint8Array) =>
    call('PUT', `/data/volumes/${name}`, data, { 'content-range': `bytes ${offset}-${offset + data.length - 1}/*` });
  const get = async (name: string, start: number, end: number) => {
    const r = await call('GET', `/data/volumes/${name}`, undefined, { range: `bytes=${start}-${end}` });
    expect(r.status, `${name} ${start}-${end}`).toBe(206);
    return { bytes: Buffer.from(await r.arrayBuffer()), contentRange: r.headers.get('content-range') };
  };
  const extents = async (name: string, query = '') => {
    const r = await call('GET', `/data/volumes/${name}/extents${query}`);
    expect(r.status, name).toBe(200);
    return DataExtents.parse(await r.json());
  };
  const refused = async (r: Response, status = 400) => {
    expect(r.status).toBe(status);
    return ErrorEnvelope.parse(await r.json()).errors[0]!;
  };

  const before = pattern(CHUNK, 1);
  beforeEach(async () => {
    mock = await startFlashArrayMock({ apiToken: 'tok' });
    const login = await fetch(`${mock.url}/api/2.26/login`, { method: 'POST', headers: { 'api-token': 'tok' } });
    token = login.headers.get('x-auth-token')!;
    // v: data at 0 and 1 MiB + 100, s1; then new data over 0, zeroes over 1 MiB, data into the hole at 2 MiB, grown to 8 MiB.
    await call('POST', 'volumes?names=v', { provisioned: 4 * MiB });
    expect((await put('v', 0, before)).status).toBe(204);
    expect((await put('v', MiB + 100, pattern(1000, 2))).status).toBe(204);
    expect((await call('POST', 'volume-snapshots?source_names=v', { suffix: 's1' })).status).toBe(200);
    await put('v', 0, pattern(CHUNK, 3));
    await call('POST', '/data/volumes/v/zeroes', { offset: MiB, length: CHUNK });
    await put('v', 2 * MiB, pattern(4096, 4));
    await call('PATCH', 'volumes?names=v', { provisioned: 8 * MiB });
  });
  afterEach(() => mock.close());

  it('reads a snapshot as it was taken (ranges, whole), whatever the volume did since', async () => {
    const head = await get('v.s1', 0, CHUNK - 1);
    expect(head.bytes.equals(before)).toBe(true);
    expect(head.contentRange).toBe(`bytes 0-${CHUNK - 1}/${4 * MiB}`);
    expect((await get('v', 0, CHUNK - 1)).bytes.equals(pattern(CHUNK, 3))).toBe(true);
    expect((await get('v.s1', MiB + 100, MiB + 1099)).bytes.equals(pattern(1000, 2))).toBe(true);
    expect((await get('v.s1', 2 * MiB, 2 * MiB + 4095)).bytes.every((b) => b === 0)).toBe(true);
    const whole = await call('GET', '/data/volumes/v.s1');
    expect(whole.status).toBe(200);
    const all = Buffer.from(await whole.arrayBuffer());
    expect(all.length).toBe(4 * MiB);
    expect(all.subarray(0, CHUNK).equals(before)).toBe(true);
    // The snapshot keeps the size it was taken with: past it is 416, though the volume grew.
    expect((await call('GET', '/data/volumes/v.s1', undefined, { range: `bytes=${4 * MiB}-${4 * MiB + 1}` })).status).toBe(416);
  });

  it('maps a snapshot\'s extents as taken: its own size, data where it had some, offset/length clipping', async () => {
    expect(await extents('v.s1')).toEqual({
      size: 4 * MiB,
      extents: [{ offset: 0, length: CHUNK, kind: 'data' }, { offset: MiB, length: CHUNK, kind: 'data' }],
    });
    expect(await extents('v.s1', `?offset=${MiB + 10}&length=${MiB}`)).toEqual({ size: 4 * MiB, extents: [{ offset: MiB + 10, length: CHUNK - 10, kind: 'data' }] });
    // The volume's own map moved on: zeroes where s1 has data, data where s1 has a hole.
    const now = await extents('v');
    expect(now.size).toBe(8 * MiB);
    expect(now.extents).toContainEqual({ offset: MiB, length: CHUNK, kind: 'zero' });
    expect(now.extents).toContainEqual({ offset: 2 * MiB, length: CHUNK, kind: 'data' });
    expect((await call('GET', `/data/volumes/v.s1/extents?offset=${4 * MiB}&length=1`)).status).toBe(416);
  });

  it('refuses writes and zeroes to a snapshot (its data unchanged); unknown, destroyed and unauthenticated reads', async () => {
    expect(await refused(await put('v.s1', 0, new Uint8Array(10).fill(9)))).toEqual({ context: 'v.s1', message: Messages.snapshotReadOnly });
    expect(await refused(await call('POST', '/data/volumes/v.s1/zeroes', { offset: 0, length: CHUNK }))).toEqual({ context: 'v.s1', message: Messages.snapshotReadOnly });
    expect((await get('v.s1', 0, CHUNK - 1)).bytes.equals(before)).toBe(true);
    expect(await refused(await call('GET', '/data/volumes/v.nope', undefined, { range: 'bytes=0-9' }))).toEqual({ context: 'v.nope', message: Messages.volumeNotExist });
    expect(await refused(await call('GET', '/data/volumes/v.nope/extents'))).toEqual({ context: 'v.nope', message: Messages.volumeNotExist });
    await call('PATCH', 'volume-snapshots?names=v.s1', { destroyed: true });
    expect(await refused(await call('GET', '/data/volumes/v.s1', undefined, { range: 'bytes=0-9' }))).toMatchObject({ message: Messages.snapshotDestroyed });
    expect(await refused(await call('GET', '/data/volumes/v.s1/extents'))).toMatchObject({ message: Messages.snapshotDestroyed });
    expect(await refused(await put('v.s1', 0, new Uint8Array(1)))).toMatchObject({ message: Messages.snapshotDestroyed });
    token = 'stale';
    expect((await call('GET', '/data/volumes/v.s1')).status).toBe(401);
  });

  it('the client maps "Snapshot is read-only." to FailedPrecondition', async () => {
    const client = new FlashArrayClient({ label: 'san', endpoint: mock.url, apiToken: 'tok', apiVersion: '2.26', timeoutMs: 5000, retry: fastRetry });
    expect(await failure(client.writeData('v.s1', 0, new Uint8Array(1)))).toMatchObject({ code: 'FailedPrecondition', data: { apiMessage: Messages.snapshotReadOnly } });
    expect(await failure(client.zeroData('v.s1', 0, 512))).toMatchObject({ code: 'FailedPrecondition' });
    await client.logout();
  });
});

describe('flasharray backend: openSnapshot over the mock', () => {
  let mock: FlashArrayMock;
  let be: FlashArrayBackend;
  const first = pattern(256 * KiB, 5);
  const devices: BlockDevice[] = [];
  const open = async (volume: string, snapshot: string) => {
    const d = await be.openSnapshot(volume, snapshot);
    devices.push(d);
    return d;
  };

  beforeEach(async () => {
    mock = await startFlashArrayMock({ apiToken: 'tok' });
    be = await makeBackend(mock.url, 'tok');
    await be.createVolume({ name: 'v', sizeBytes: 4 * MiB });
    const dev = await be.openVolume('v', 'rw');
    await dev.write(0, first);
    await dev.write(3 * MiB, pattern(CHUNK, 6));
    await be.createSnapshot('v', 's1');
    // Overwritten, zeroed and grown after the snapshot.
    await dev.write(0, pattern(256 * KiB, 7));
    await dev.writeZeroes!(3 * MiB, CHUNK);
    await dev.close();
    await be.resizeVolume('v', 8 * MiB);
  });
  afterEach(async () => {
    for (const d of devices.splice(0)) await d.close();
    await be.close();
    await mock.close();
  });

  it('reports data.read with snapshots: true', async () => {
    const caps = await be.capabilities();
    expect(caps.limits('data.read')).toEqual({ snapshots: true });
    expect(caps.hasAll('data.write', 'data.extents', 'data.dirty')).toBe(true);
  });

  it('reads the snapshot after the volume was overwritten: the old data, at the size it was taken with', async () => {
    const snap = await open('v', 's1');
    expect(snap.sizeBytes).toBe(4 * MiB);
    expect(snap.blockSize).toBe(512);
    expect(Buffer.from(await snap.read(0, first.length)).equals(first)).toBe(true);
    expect(Buffer.from(await snap.read(3 * MiB, CHUNK)).equals(pattern(CHUNK, 6))).toBe(true);
    expect(Buffer.from(await snap.read(100, 0)).length).toBe(0);
    const whole = Buffer.from(await snap.read(0, 4 * MiB));
    expect(whole.subarray(0, first.length).equals(first)).toBe(true);
    expect(whole.subarray(first.length, 3 * MiB).every((b) => b === 0)).toBe(true);
    // The volume itself reads its new data.
    const vol = await be.openVolume('v', 'r');
    devices.push(vol);
    expect(Buffer.from(await vol.read(0, first.length)).equals(pattern(256 * KiB, 7))).toBe(true);
    expect(await failure(snap.read(4 * MiB - 1, 2))).toMatchObject({ code: 'OutOfRange', ref: 'san/v@s1' });
    // Another snapshot taken now sees the new data; s1 still the old.
    await be.createSnapshot('v', 's2');
    const s2 = await open('v', 's2');
    expect(s2.sizeBytes).toBe(8 * MiB);
    expect(Buffer.from(await s2.read(0, 16)).equals(pattern(256 * KiB, 7).subarray(0, 16))).toBe(true);
    expect(Buffer.from(await snap.read(0, 16)).equals(first.subarray(0, 16))).toBe(true);
  });

  it('maps the snapshot\'s extents as taken, with ranges', async () => {
    const snap = await open('v', 's1');
    expect(await snap.extents()).toEqual([
      { offset: 0, length: 256 * KiB, kind: 'data' }, { offset: 3 * MiB, length: CHUNK, kind: 'data' },
    ]);
    expect(await snap.extents(3 * MiB + 10, MiB - 10)).toEqual([{ offset: 3 * MiB + 10, length: CHUNK - 10, kind: 'data' }]);
    expect(await snap.extents(MiB, MiB)).toEqual([]);
    expect(await snap.extents(4 * MiB, 0)).toEqual([]);
    await expect(snap.extents(0, 4 * MiB + 1)).rejects.toMatchObject({ code: 'OutOfRange' });
    const vol = await be.openVolume('v', 'r');
    devices.push(vol);
    expect(await vol.extents(3 * MiB, CHUNK)).toEqual([{ offset: 3 * MiB, length: CHUNK, kind: 'zero' }]);
  });

  it('refuses writes, zeroes and trims (FailedPrecondition) without asking the array; the data stays', async () => {
    // Rules that only count: every PUT and POST that reaches the data plane.
    mock.faults.add({ method: 'PUT', path: '/data/**', action: { type: 'latency', ms: 0 } });
    mock.faults.add({ method: 'POST', path: '/data/**', action: { type: 'latency', ms: 0 } });
    const snap = await open('v', 's1');
    for (const [what, op] of [
      ['write', () => snap.write(0, new Uint8Array(512))],
      ['write past the end', () => snap.write(4 * MiB, new Uint8Array(512))],
      ['writeZeroes', () => snap.writeZeroes!(0, CHUNK)],
      ['discard', () => snap.discard!(0, CHUNK)],
    ] as const) {
      const e = await failure(op());
      expect(e, what).toMatchObject({ code: 'FailedPrecondition', ref: 'san/v@s1' });
      expect(e.message, what).toContain('read-only');
    }
    await snap.flush();
    expect(mock.faults.list().map((r) => r.calls)).toEqual([0, 0]);
    expect(Buffer.from(await snap.read(0, first.length)).equals(first)).toBe(true);
    // A volume opened read-only refuses a trim as well; one opened read-write has no discard (a trim changes nothing).
    const ro = await be.openVolume('v', 'r');
    const rw = await be.openVolume('v', 'rw');
    devices.push(ro, rw);
    expect(await failure(ro.discard!(0, 512))).toMatchObject({ code: 'FailedPrecondition', ref: 'san/v' });
    expect(rw.discard).toBeUndefined();
    // Closed: nothing more, reads included.
    await snap.close();
    expect(await failure(snap.read(0, 1))).toMatchObject({ code: 'FailedPrecondition' });
  });

  it('an unknown or destroyed snapshot, or an unknown volume, is NotFound naming it', async () => {
    expect(await failure(be.openSnapshot('v', 'nope'))).toMatchObject({ code: 'NotFound', ref: 'san/v@nope' });
    expect(await failure(be.openSnapshot('ghost', 's1'))).toMatchObject({ code: 'NotFound', ref: 'san/ghost' });
    expect(await failure(be.openSnapshot('v', 'bad.name'))).toMatchObject({ code: 'NotFound', ref: 'san/v@bad.name' });
    expect(await failure(be.openSnapshot('bad.name', 's1'))).toMatchObject({ code: 'NotFound', ref: 'san/bad.name' });
    // Deleted while open: reads fail as NotFound; then opening it again is NotFound too.
    const snap = await open('v', 's1');
    await be.deleteSnapshot('v', 's1');
    expect((await failure(snap.read(0, 512))).code).toBe('NotFound');
    expect(await failure(be.openSnapshot('v', 's1'))).toMatchObject({ code: 'NotFound', ref: 'san/v@s1' });
    // Pending eradication (an interrupted delete) counts as gone.
    await be.createSnapshot('v', 's3');
    const login = await fetch(`${mock.url}/api/2.26/login`, { method: 'POST', headers: { 'api-token': 'tok' } });
    await fetch(`${mock.url}/api/2.26/volume-snapshots?names=v.s3`, {
      method: 'PATCH', headers: { 'x-auth-token': login.headers.get('x-auth-token')!, 'content-type': 'application/json' }, body: '{"destroyed":true}',
    });
    expect(await failure(be.openSnapshot('v', 's3'))).toMatchObject({ code: 'NotFound', ref: 'san/v@s3' });
  });

  it('rides out 503s, a reset, a 429 and a revoked session during a snapshot read and its extents', async () => {
    const snap = await open('v', 's1');
    mock.faults.add({ method: 'GET', path: '/data/volumes/*', nth: [1, 2], action: { type: 'status', status: 503 } });
    mock.faults.add({ method: 'GET', path: '/data/volumes/*', nth: [4], action: { type: 'revoke-token' } });
    mock.faults.add({ method: 'GET', path: '/data/volumes/*/extents', nth: [1], action: { type: 'reset', afterProcessing: false } });
    mock.faults.add({ method: 'GET', path: '/data/volumes/*/extents', nth: [2], action: { type: 'status', status: 429, rateLimitHeaders: false } });
    expect(Buffer.from(await snap.read(0, first.length)).equals(first)).toBe(true);
    expect(Buffer.from(await snap.read(0, 512)).equals(first.subarray(0, 512))).toBe(true);
    expect((await snap.extents()).map((e) => e.offset)).toEqual([0, 3 * MiB]);
    const [r503, revoke, reset, r429] = mock.faults.list();
    expect(r503!.fired).toBe(2);
    expect(revoke!.fired).toBe(1);
    expect(reset!.fired).toBe(1);
    expect(r429!.fired).toBe(1);
    // The first read: 2 × 503, then its data; the second: 401 (session revoked), log in, again.
    expect(r503!.calls).toBe(5);
  });

  it('lists snapshots oldest first, whatever their names (what picks the points before a snapshot relies on)', async () => {
    for (const name of ['zz', 'aa', 'mm']) {
      await new Promise((r) => setTimeout(r, 3)); // distinct creation times (ms)
      await be.createSnapshot('v', name);
    }
    expect((await be.listSnapshots('v')).map((x) => x.name)).toEqual(['s1', 'zz', 'aa', 'mm']);
  });

  it('gives up after the retries with BackendUnavailable', async () => {
    const snap = await open('v', 's1');
    mock.faults.add({ method: 'GET', path: '/data/volumes/*', action: { type: 'status', status: 503 } });
    expect(await failure(snap.read(0, 512))).toMatchObject({ code: 'BackendUnavailable', data: { attempts: 4 } });
  });
});

async function failure(p: Promise<unknown>): Promise<OffloadError> {
  try {
    await p;
  } catch (e) {
    if (isOffloadError(e)) return e;
    throw e;
  }
  throw new Error('expected a failure');
}
