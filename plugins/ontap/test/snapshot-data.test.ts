/**
 * A snapshot's data through the mock appliance's data plane (`/data/volumes/{id}?snapshot.name=`
 * or `?snapshot.uuid=`, the stand-in for a volume's `.snapshot` directory over NFS) over plain
 * HTTP — its bytes and extents as taken, whatever the volume does since; writes refused; ONTAP
 * errors — and the backend's openSnapshot through it: read-only device, typed errors, faults.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { BlockDevice } from '../../../core/index.js';
import { OntapCode } from '../api/codes.js';
import { Collection, ErrorBody, ExtentList, Snapshot, Volume } from '../api/schemas.js';
import { startOntapMock, type OntapMock } from '../appliance/server.js';
import type { OntapBackend } from '../backend.js';
import { failure, makeBackend } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;

function pattern(size: number, seed: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return b;
}

let m: OntapMock;
const auth = () => `Basic ${Buffer.from(`${m.username}:${m.password}`).toString('base64')}`;

async function call(method: string, path: string, body?: Uint8Array | object, headers: Record<string, string> = {}): Promise<Response> {
  const init: RequestInit = { method, headers: { authorization: auth(), ...headers } };
  if (body instanceof Uint8Array) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    (init.headers as Record<string, string>)['content-type'] = 'application/json';
  }
  return fetch(m.url + path, init);
}

describe('mock ONTAP: a snapshot through the data plane', () => {
  let v: string;
  let s1: string;
  const before = pattern(CHUNK, 1);

  const put = (path: string, offset: number, data: Uint8Array) =>
    call('PUT', path, data, { 'content-range': `bytes ${offset}-${offset + data.length - 1}/*` });
  const get = async (path: string, start: number, end: number) => {
    const r = await call('GET', path, undefined, { range: `bytes=${start}-${end}` });
    expect(r.status, `${path} ${start}-${end}`).toBe(206);
    return { bytes: Buffer.from(await r.arrayBuffer()), contentRange: r.headers.get('content-range') };
  };
  const extents = async (path: string) => {
    const r = await call('GET', path);
    expect(r.status, path).toBe(200);
    return ExtentList.parse(await r.json());
  };
  const refused = async (r: Response, status: number) => {
    expect(r.status).toBe(status);
    return ErrorBody.parse(await r.json()).error;
  };

  beforeEach(async () => {
    m = await startOntapMock({ port: 0, jobDurationMs: 5 });
    expect((await call('POST', '/api/storage/volumes?return_timeout=5', { name: 'v', svm: { name: 'svm0' }, size: 4 * MiB })).status).toBe(201);
    v = Collection(Volume).parse(await (await call('GET', '/api/storage/volumes?name=v')).json()).records[0]!.uuid;
    // v: data at 0 and 1 MiB + 100, s1; then new data over 0, data into the hole at 2 MiB, grown to 8 MiB.
    expect((await put(`/data/volumes/${v}`, 0, before)).status).toBe(204);
    expect((await put(`/data/volumes/${v}`, MiB + 100, pattern(1000, 2))).status).toBe(204);
    expect((await call('POST', `/api/storage/volumes/${v}/snapshots?return_timeout=5`, { name: 's1' })).status).toBe(201);
    s1 = Collection(Snapshot).parse(await (await call('GET', `/api/storage/volumes/${v}/snapshots?name=s1`)).json()).records[0]!.uuid;
    await put(`/data/volumes/${v}`, 0, pattern(CHUNK, 3));
    await put(`/data/volumes/${v}`, 2 * MiB, pattern(4096, 4));
    expect((await call('PATCH', `/api/storage/volumes/${v}?return_timeout=5`, { size: 8 * MiB })).status).toBe(200);
  });
  afterEach(() => m.close());

  it('reads a snapshot as it was taken, by snapshot.name or snapshot.uuid, by volume uuid or name', async () => {
    for (const path of [`/data/volumes/${v}?snapshot.name=s1`, `/data/volumes/${v}?snapshot.uuid=${s1}`, '/data/volumes/v?snapshot.name=s1',
      `/data/volumes/${v}?snapshot.name=s1&snapshot.uuid=${s1}`]) {
      const head = await get(path, 0, CHUNK - 1);
      expect(head.bytes.equals(before), path).toBe(true);
      expect(head.contentRange, path).toBe(`bytes 0-${CHUNK - 1}/${4 * MiB}`);
    }
    expect((await get(`/data/volumes/${v}`, 0, CHUNK - 1)).bytes.equals(pattern(CHUNK, 3))).toBe(true);
    expect((await get(`/data/volumes/${v}?snapshot.name=s1`, MiB + 100, MiB + 1099)).bytes.equals(pattern(1000, 2))).toBe(true);
    expect((await get(`/data/volumes/${v}?snapshot.name=s1`, 2 * MiB, 2 * MiB + 4095)).bytes.every((b) => b === 0)).toBe(true);
    const whole = await call('GET', `/data/volumes/${v}?snapshot.name=s1`);
    expect(whole.status).toBe(200);
    const all = Buffer.from(await whole.arrayBuffer());
    expect(all.length).toBe(4 * MiB);
    expect(all.subarray(0, CHUNK).equals(before)).toBe(true);
    // The snapshot keeps the size it was taken with: past it is 416, though the volume grew.
    expect(await refused(await call('GET', `/data/volumes/${v}?snapshot.name=s1`, undefined, { range: `bytes=${4 * MiB}-` }), 416))
      .toMatchObject({ code: OntapCode.INVALID_INPUT, target: 'range' });
  });

  it('maps a snapshot\'s extents as taken: its own size, data where it had some, offset/length clipping', async () => {
    expect(await extents(`/data/volumes/${v}/extents?snapshot.name=s1`)).toEqual({
      size: 4 * MiB,
      extents: [{ offset: 0, length: CHUNK, kind: 'data' }, { offset: MiB, length: CHUNK, kind: 'data' }],
    });
    expect(await extents(`/data/volumes/${v}/extents?snapshot.uuid=${s1}&offset=${MiB + 10}&length=${MiB}`))
      .toEqual({ size: 4 * MiB, extents: [{ offset: MiB + 10, length: CHUNK - 10, kind: 'data' }] });
    const now = await extents(`/data/volumes/${v}/extents`);
    expect(now.size).toBe(8 * MiB);
    expect(now.extents).toContainEqual({ offset: 2 * MiB, length: CHUNK, kind: 'data' });
    expect(await refused(await call('GET', `/data/volumes/${v}/extents?snapshot.name=s1&offset=${4 * MiB + 1}`), 416)).toMatchObject({ target: 'offset' });
  });

  it('a PUT to a snapshot is 409 code 917905 and changes nothing; an unknown snapshot is 404 code 4 naming the field', async () => {
    expect(await refused(await put(`/data/volumes/${v}?snapshot.name=s1`, 0, new Uint8Array(10).fill(9)), 409))
      .toMatchObject({ code: OntapCode.READ_ONLY, target: 'snapshot.name' });
    expect(await refused(await put(`/data/volumes/${v}?snapshot.uuid=${s1}`, 0, new Uint8Array(10).fill(9)), 409))
      .toMatchObject({ code: OntapCode.READ_ONLY, target: 'snapshot.uuid' });
    expect((await get(`/data/volumes/${v}?snapshot.name=s1`, 0, CHUNK - 1)).bytes.equals(before)).toBe(true);
    expect((await get(`/data/volumes/${v}`, 0, 9)).bytes.equals(pattern(CHUNK, 3).subarray(0, 10))).toBe(true);
    expect(await refused(await call('GET', `/data/volumes/${v}?snapshot.name=nope`), 404)).toMatchObject({ code: OntapCode.NOT_FOUND, target: 'snapshot.name' });
    expect(await refused(await call('GET', `/data/volumes/${v}/extents?snapshot.uuid=nope`), 404)).toMatchObject({ code: OntapCode.NOT_FOUND, target: 'snapshot.uuid' });
    expect(await refused(await put(`/data/volumes/${v}?snapshot.name=nope`, 0, new Uint8Array(1)), 404)).toMatchObject({ code: OntapCode.NOT_FOUND });
    // Name and uuid of two different snapshots: no such snapshot.
    await call('POST', `/api/storage/volumes/${v}/snapshots?return_timeout=5`, { name: 's2' });
    expect((await call('GET', `/data/volumes/${v}?snapshot.name=s2&snapshot.uuid=${s1}`)).status).toBe(404);
    expect((await fetch(`${m.url}/data/volumes/${v}?snapshot.name=s1`)).status).toBe(401);
  });
});

describe('ontap backend: openSnapshot over the mock', () => {
  let be: OntapBackend;
  const first = pattern(256 * KiB, 5);
  const devices: BlockDevice[] = [];
  const open = async (volume: string, snapshot: string) => {
    const d = await be.openSnapshot(volume, snapshot);
    devices.push(d);
    return d;
  };

  beforeEach(async () => {
    m = await startOntapMock({ port: 0, jobDurationMs: 5 });
    be = makeBackend(m.url);
    await be.createVolume({ name: 'v', sizeBytes: 4 * MiB });
    const dev = await be.openVolume('v', 'rw');
    await dev.write(0, first);
    await dev.write(3 * MiB, pattern(CHUNK, 6));
    await be.createSnapshot('v', 's1');
    // Overwritten, zeroed and grown after the snapshot.
    await dev.write(0, pattern(256 * KiB, 7));
    await dev.write(3 * MiB, new Uint8Array(CHUNK));
    await dev.close();
    await be.resizeVolume('v', 8 * MiB);
  });
  afterEach(async () => {
    for (const d of devices.splice(0)) await d.close();
    await m.close();
  });

  it('reports data.read with snapshots: true', async () => {
    const caps = await be.capabilities();
    expect(caps.limits('data.read')).toEqual({ snapshots: true });
    expect(caps.hasAll('data.write', 'data.extents', 'data.dirty', 'clone.linked', 'chain.stream')).toBe(true);
  });

  it('reads the snapshot after the volume was overwritten: the old data, at the size it was taken with', async () => {
    const snap = await open('v', 's1');
    expect(snap.sizeBytes).toBe(4 * MiB);
    expect(Buffer.from(await snap.read(0, first.length)).equals(first)).toBe(true);
    expect(Buffer.from(await snap.read(3 * MiB, CHUNK)).equals(pattern(CHUNK, 6))).toBe(true);
    expect((await snap.read(100, 0)).length).toBe(0);
    const whole = Buffer.from(await snap.read(0, 4 * MiB));
    expect(whole.subarray(0, first.length).equals(first)).toBe(true);
    expect(whole.subarray(first.length, 3 * MiB).every((b) => b === 0)).toBe(true);
    const vol = await be.openVolume('v', 'r');
    devices.push(vol);
    expect(Buffer.from(await vol.read(0, first.length)).equals(pattern(256 * KiB, 7))).toBe(true);
    expect(await failure(snap.read(4 * MiB - 1, 2))).toMatchObject({ code: 'OutOfRange' });
    // A snapshot taken now sees the new data and size; s1 still the old.
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
    await expect(snap.extents(0, 4 * MiB + 1)).rejects.toMatchObject({ code: 'OutOfRange' });
    // The volume's zeros over 3 MiB left it no data there (the store keeps zeros thin).
    const vol = await be.openVolume('v', 'r');
    devices.push(vol);
    expect(await vol.extents(3 * MiB, CHUNK)).toEqual([]);
  });

  it('refuses writes, zeroes and trims (FailedPrecondition) without asking the appliance; the data stays', async () => {
    m.faults.add({ method: 'PUT', path: '/data/**', action: { type: 'latency', ms: 0 } }); // counts what reaches it
    const snap = await open('v', 's1');
    for (const [what, op] of [
      ['write', () => snap.write(0, new Uint8Array(512))],
      ['write past the end', () => snap.write(4 * MiB, new Uint8Array(512))],
      ['writeZeroes', () => snap.writeZeroes!(0, CHUNK)],
      ['discard', () => snap.discard!(0, CHUNK)],
    ] as const) {
      const e = await failure(op());
      expect(e, what).toMatchObject({ code: 'FailedPrecondition', ref: 'nas1/v@s1' });
      expect(e.message, what).toContain('read-only');
    }
    await snap.flush();
    expect(m.faults.list()[0]!.calls).toBe(0);
    expect(Buffer.from(await snap.read(0, first.length)).equals(first)).toBe(true);
    // A volume opened read-only refuses zeroes and trims as well; one opened read-write has neither (as before).
    const ro = await be.openVolume('v', 'r');
    const rw = await be.openVolume('v', 'rw');
    devices.push(ro, rw);
    expect(await failure(ro.discard!(0, 512))).toMatchObject({ code: 'FailedPrecondition', ref: 'nas1/v' });
    expect(await failure(ro.writeZeroes!(0, 512))).toMatchObject({ code: 'FailedPrecondition', ref: 'nas1/v' });
    expect(rw.discard).toBeUndefined();
    expect(rw.writeZeroes).toBeUndefined();
    await snap.close();
    expect(await failure(snap.read(0, 1))).toMatchObject({ code: 'FailedPrecondition' });
  });

  it('an unknown snapshot or volume is NotFound naming it; a snapshot taken again under its name is not read in its place', async () => {
    expect(await failure(be.openSnapshot('v', 'nope'))).toMatchObject({ code: 'NotFound', ref: 'nas1/v@nope' });
    expect(await failure(be.openSnapshot('ghost', 's1'))).toMatchObject({ code: 'NotFound', ref: 'nas1/ghost' });
    const snap = await open('v', 's1');
    await be.deleteSnapshot('v', 's1');
    expect((await failure(snap.read(0, 512))).code).toBe('NotFound');
    expect(await failure(be.openSnapshot('v', 's1'))).toMatchObject({ code: 'NotFound', ref: 'nas1/v@s1' });
    await be.createSnapshot('v', 's1');
    expect((await failure(snap.read(0, 512))).code).toBe('NotFound');
    const again = await open('v', 's1');
    expect(again.sizeBytes).toBe(8 * MiB);
    expect(Buffer.from(await again.read(0, 16)).equals(pattern(256 * KiB, 7).subarray(0, 16))).toBe(true);
  });

  it('rides out 503s (with Retry-After), a 429 and a reset during a snapshot read and its extents', async () => {
    const snap = await open('v', 's1');
    m.faults.add({ method: 'GET', path: '/data/volumes/*', nth: [1, 2], action: { type: 'status', status: 503, retryAfter: 0 } });
    m.faults.add({ method: 'GET', path: '/data/volumes/*/extents', nth: [1], action: { type: 'status', status: 429, retryAfter: 0 } });
    m.faults.add({ method: 'GET', path: '/data/volumes/*/extents', nth: [2], action: { type: 'reset', afterProcessing: false } });
    expect(Buffer.from(await snap.read(0, first.length)).equals(first)).toBe(true);
    expect((await snap.extents()).map((e) => e.offset)).toEqual([0, 3 * MiB]);
    const [r503, r429, reset] = m.faults.list();
    expect(r503).toMatchObject({ fired: 2, calls: 3 });
    expect(r429).toMatchObject({ fired: 1 });
    expect(reset).toMatchObject({ fired: 1, calls: 3 });
  });

  it('lists snapshots oldest first, though the appliance pages them by uuid (what picks the points before a snapshot relies on)', async () => {
    const names = ['s1', 'zz', 'aa', 'mm', 'b2', 'b1'];
    for (const name of names.slice(1)) {
      await new Promise((r) => setTimeout(r, 3)); // distinct create_time (ms)
      await be.createSnapshot('v', name);
    }
    expect((await be.listSnapshots('v')).map((x) => x.name)).toEqual(names);
  });

  it('gives up after the retries with BackendUnavailable', async () => {
    const snap = await open('v', 's1');
    m.faults.add({ method: 'GET', path: '/data/volumes/*', action: { type: 'status', status: 503, retryAfter: 0 } });
    expect(await failure(snap.read(0, 512))).toMatchObject({ code: 'BackendUnavailable', data: { attempts: 3 } });
  });
});
