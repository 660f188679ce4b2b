/**
 * The mock appliance's block diff (`GET /api/storage/volumes/{uuid}/block-diff`, the block-level
 * stand-in for SnapDiff) over plain HTTP — ranges, clipping, `_links.next` paging, ONTAP errors —
 * and the backend's changedExtents through it, with faults the client must ride out.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { OntapCode } from '../api/codes.js';
import { BlockDiffCollection, Collection, ErrorBody, Snapshot, Volume } from '../api/schemas.js';
import { startOntapMock, type OntapMock } from '../appliance/server.js';
import type { OntapBackend } from '../backend.js';
import { failure, makeBackend } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;

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
const put = (uuid: string, offset: number, data: Uint8Array) =>
  call('PUT', `/data/volumes/${uuid}`, data, { 'content-range': `bytes ${offset}-${offset + data.length - 1}/*` });
async function createVolume(name: string, size: number): Promise<string> {
  expect((await call('POST', '/api/storage/volumes?return_timeout=5', { name, svm: { name: 'svm0' }, size })).status).toBe(201);
  const list = Collection(Volume).parse(await (await call('GET', `/api/storage/volumes?name=${name}`)).json());
  return list.records[0]!.uuid;
}
async function snapshot(uuid: string, name: string): Promise<string> {
  expect((await call('POST', `/api/storage/volumes/${uuid}/snapshots?return_timeout=5`, { name })).status).toBe(201);
  const list = Collection(Snapshot).parse(await (await call('GET', `/api/storage/volumes/${uuid}/snapshots?name=${name}`)).json());
  return list.records[0]!.uuid;
}

describe('mock ONTAP: GET /api/storage/volumes/{uuid}/block-diff', () => {
  let v: string;
  let s1: string;
  const diff = async (uuid: string, query: string) => {
    const r = await call('GET', `/api/storage/volumes/${uuid}/block-diff?${query}`);
    expect(r.status, query).toBe(200);
    return BlockDiffCollection.parse(await r.json());
  };
  const refused = async (path: string, status: number) => {
    const r = await call('GET', path);
    expect(r.status, path).toBe(status);
    return ErrorBody.parse(await r.json()).error;
  };

  beforeEach(async () => {
    m = await startOntapMock({ port: 0, jobDurationMs: 5 });
    // v: data at 0 and 1 MiB, s1; zeros over 0 (changed), zeros into the hole at 3 MiB (no change),
    // a small write at 2 MiB + 10, s2; then 3.5 MiB.
    v = await createVolume('v', 4 * MiB);
    await put(v, 0, new Uint8Array(CHUNK).fill(1));
    await put(v, MiB, new Uint8Array(CHUNK).fill(2));
    s1 = await snapshot(v, 's1');
    await put(v, 0, new Uint8Array(CHUNK));
    await put(v, 3 * MiB, new Uint8Array(CHUNK));
    await put(v, 2 * MiB + 10, new Uint8Array(20).fill(3));
    await snapshot(v, 's2');
    await put(v, 3.5 * MiB, new Uint8Array(1).fill(4));
  });
  afterEach(() => m.close());

  it('answers the changed chunks against the volume now or a later snapshot, with unit, size and self link', async () => {
    const now = await diff(v, 'base_snapshot.name=s1');
    expect(now).toMatchObject({ block_size: CHUNK, size: 4 * MiB, num_records: 3 });
    expect(now.records).toEqual([{ offset: 0, length: CHUNK }, { offset: 2 * MiB, length: CHUNK }, { offset: 3.5 * MiB, length: CHUNK }]);
    expect(now._links?.self?.href).toBe(`/api/storage/volumes/${v}/block-diff?base_snapshot.name=s1`);
    expect(now._links?.next).toBeUndefined();
    expect((await diff(v, `base_snapshot.uuid=${s1}&diff_snapshot.name=s2`)).records).toEqual(now.records.slice(0, 2));
    expect((await diff(v, 'base_snapshot.name=s2')).records).toEqual([{ offset: 3.5 * MiB, length: CHUNK }]);
    expect((await diff(v, 'base_snapshot.name=s2&diff_snapshot.name=s2')).records).toEqual([]);
    // offset/length clip, also inside a chunk and past the end.
    expect((await diff(v, `base_snapshot.name=s1&offset=${CHUNK - 10}&length=${2 * MiB}`)).records)
      .toEqual([{ offset: CHUNK - 10, length: 10 }, { offset: 2 * MiB, length: CHUNK - 10 }]);
    expect((await diff(v, `base_snapshot.name=s1&offset=${3.5 * MiB + 1}&length=${64 * MiB}`)).records).toEqual([{ offset: 3.5 * MiB + 1, length: CHUNK - 1 }]);
    expect((await diff(v, `base_snapshot.name=s1&offset=${8 * MiB}`)).records).toEqual([]);
    expect((await diff(v, 'base_snapshot.name=s1&length=0')).records).toEqual([]);
  });

  it('pages with max_records and _links.next (start.offset), surviving writes between pages; a short page still links next', async () => {
    const first = await diff(v, 'base_snapshot.name=s1&max_records=1');
    expect(first.records).toEqual([{ offset: 0, length: CHUNK }]);
    expect(first._links?.next?.href).toContain(`start.offset=${CHUNK}`);
    await put(v, MiB + 5, new Uint8Array(1).fill(9)); // after the cursor: the next pages see it
    const seen = [...first.records];
    let href = first._links?.next?.href;
    for (let i = 0; href && i < 10; i++) {
      const r = await call('GET', href);
      const p = BlockDiffCollection.parse(await r.json());
      seen.push(...p.records);
      href = p._links?.next?.href;
    }
    expect(href).toBeUndefined();
    expect(seen.map((r) => r.offset)).toEqual([0, MiB, 2 * MiB, 3.5 * MiB]);
    m.faults.add({ method: 'GET', path: '/api/storage/volumes/*/block-diff', nth: [1], action: { type: 'short-page', items: 1 } });
    const short = await diff(v, 'base_snapshot.name=s1');
    expect(short.num_records).toBe(1);
    expect(short._links?.next?.href).toBeDefined();
  });

  it('unknown volume or snapshot is 404 code 4 naming the field; order, missing base and bad numbers are 400 code 262179', async () => {
    const w = await createVolume('w', MiB);
    await snapshot(w, 'theirs');
    const path = (q: string, uuid = v) => `/api/storage/volumes/${uuid}/block-diff?${q}`;
    expect(await refused(path('base_snapshot.name=s1', 'no-such-uuid'), 404)).toMatchObject({ code: OntapCode.NOT_FOUND, target: 'uuid' });
    expect(await refused(path('base_snapshot.name=nope'), 404)).toMatchObject({ code: OntapCode.NOT_FOUND, target: 'base_snapshot.name' });
    expect(await refused(path('base_snapshot.uuid=nope'), 404)).toMatchObject({ code: OntapCode.NOT_FOUND, target: 'base_snapshot.uuid' });
    expect(await refused(path('base_snapshot.name=theirs'), 404)).toMatchObject({ code: OntapCode.NOT_FOUND, target: 'base_snapshot.name' });
    expect(await refused(path('base_snapshot.name=s1&diff_snapshot.name=nope'), 404)).toMatchObject({ code: OntapCode.NOT_FOUND, target: 'diff_snapshot.name' });
    expect(await refused(path(`base_snapshot.name=s2&base_snapshot.uuid=${s1}`), 404)).toMatchObject({ code: OntapCode.NOT_FOUND }); // name and uuid disagree
    expect(await refused(path('base_snapshot.name=s2&diff_snapshot.name=s1'), 400)).toMatchObject({ code: OntapCode.INVALID_INPUT, target: 'base_snapshot.name' });
    expect(await refused(path('diff_snapshot.name=s2'), 400)).toMatchObject({ code: OntapCode.INVALID_INPUT, target: 'base_snapshot.name' });
    for (const bad of ['offset=-1', 'length=x', 'max_records=0', 'start.offset=1.5']) {
      expect(await refused(path(`base_snapshot.name=s1&${bad}`), 400), bad).toMatchObject({ code: OntapCode.INVALID_INPUT, target: bad.split('=')[0] });
    }
    const anon = await fetch(`${m.url}${path('base_snapshot.name=s1')}`);
    expect(anon.status).toBe(401);
    expect((await call('POST', path('base_snapshot.name=s1'), {})).status).toBe(404);
  });
});

describe('ontap backend: changedExtents over the mock', () => {
  let be: OntapBackend;

  beforeEach(async () => {
    m = await startOntapMock({ port: 0, jobDurationMs: 5 });
    be = makeBackend(m.url);
    await be.createVolume({ name: 'v', sizeBytes: 4 * MiB });
    const dev = await be.openVolume('v', 'rw');
    await dev.write(0, new Uint8Array(CHUNK).fill(1));
    await be.createSnapshot('v', 's1');
    await dev.write(MiB + 5, new Uint8Array(10).fill(2));
    await dev.write(3 * MiB, new Uint8Array(CHUNK).fill(3));
    await be.createSnapshot('v', 's2');
    await dev.close();
  });
  afterEach(() => m.close());

  it('maps the answer to extents, granularity and size; clips to the range', async () => {
    expect(await be.changedExtents('v', { since: 's1' })).toEqual({
      extents: [{ offset: MiB, length: CHUNK }, { offset: 3 * MiB, length: CHUNK }], granularity: CHUNK, sizeBytes: 4 * MiB,
    });
    expect((await be.changedExtents('v', { since: 's1', until: 's2', offset: MiB + 1, length: 2 * MiB })).extents)
      .toEqual([{ offset: MiB + 1, length: CHUNK - 1 }, { offset: 3 * MiB, length: 1 }]);
    expect((await be.changedExtents('v', { since: 's2' })).extents).toEqual([]);
    expect((await be.capabilities()).has('data.dirty')).toBe(true);
  });

  it('rides out 503s (with Retry-After) and short pages', async () => {
    m.faults.add({ method: 'GET', path: '/api/storage/volumes/*/block-diff', nth: [1, 2], action: { type: 'status', status: 503, retryAfter: 0 } });
    m.faults.add({ method: 'GET', path: '/api/storage/volumes/*/block-diff', action: { type: 'short-page', items: 1 } });
    const a = await be.changedExtents('v', { since: 's1' });
    expect(a.extents).toEqual([{ offset: MiB, length: CHUNK }, { offset: 3 * MiB, length: CHUNK }]);
    const [status] = m.faults.list();
    expect(status!.fired).toBe(2);
    expect(status!.calls).toBe(4); // 2 × 503, then two short pages
  });

  it('gives up after the retries with BackendUnavailable', async () => {
    m.faults.add({ method: 'GET', path: '/api/storage/volumes/*/block-diff', action: { type: 'status', status: 503, retryAfter: 0 } });
    expect((await failure(be.changedExtents('v', { since: 's1' }))).code).toBe('BackendUnavailable');
  });

  it('types the errors: unknown volume or snapshot NotFound, until older than since and bad numbers InvalidArgument', async () => {
    expect(await failure(be.changedExtents('v', { since: 'nope' }))).toMatchObject({ code: 'NotFound', ref: 'nas1/v@nope' });
    expect(await failure(be.changedExtents('v', { since: 's1', until: 'nope' }))).toMatchObject({ code: 'NotFound', ref: 'nas1/v@nope' });
    expect(await failure(be.changedExtents('ghost', { since: 's1' }))).toMatchObject({ code: 'NotFound', ref: 'nas1/ghost' });
    expect(await failure(be.changedExtents('v', { since: 's2', until: 's1' }))).toMatchObject({ code: 'InvalidArgument' });
    expect(await failure(be.changedExtents('v', { since: 's1', length: -5 }))).toMatchObject({ code: 'InvalidArgument' });
    await be.deleteSnapshot('v', 's1');
    expect(await failure(be.changedExtents('v', { since: 's1' }))).toMatchObject({ code: 'NotFound', ref: 'nas1/v@s1' });
  });
});
