/**
 * The mock array's volume diff (`GET /api/2.N/volumes/diff`, the stand-in for Purity's REST 1.x
 * volume diff) over plain HTTP — ranges, units, segments, paging, errors — and the backend's
 * changedExtents through it, with faults the client must ride out.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { isOffloadError, type OffloadError } from '../../../core/index.js';
import { Messages } from '../api/messages.js';
import { ErrorEnvelope, VolumeDiffList } from '../api/schemas.js';
import { startFlashArrayMock, type FlashArrayMock } from '../appliance/index.js';
import type { FlashArrayBackend } from '../backend.js';
import { callMock, makeBackend } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;

describe('mock FlashArray: GET volumes/diff', () => {
  let mock: FlashArrayMock;
  let token: string;

  const call = (method: string, path: string, body?: Uint8Array | object, headers: Record<string, string> = {}) =>
    callMock(mock.url, token, method, path, body, headers);
  const put = (vol: string, offset: number, data: Uint8Array) =>
    call('PUT', `/data/volumes/${vol}`, data, { 'content-range': `bytes ${offset}-${offset + data.length - 1}/*` });
  const diff = async (query: string) => {
    const r = await call('GET', `volumes/diff?${query}`);
    expect(r.status, query).toBe(200);
    return { body: VolumeDiffList.parse(await r.json()), header: r.headers.get('x-next-token') };
  };
  const refused = async (query: string, status = 400) => {
    const r = await call('GET', `volumes/diff?${query}`);
    expect(r.status, query).toBe(status);
    return ErrorEnvelope.parse(await r.json()).errors[0]!;
  };

  beforeEach(async () => {
    mock = await startFlashArrayMock({ apiToken: 'tok' });
    const login = await fetch(`${mock.url}/api/2.26/login`, { method: 'POST', headers: { 'api-token': 'tok' } });
    token = login.headers.get('x-auth-token')!;
    // v: data at 0 and 1 MiB, s1; zeros over 0, a write into the hole at 2 MiB + 10, whole-chunk
    // zeroes over 1 MiB, zeroes over the unallocated 3 MiB (reads the same: no change), s2; then 3.5 MiB.
    await call('POST', 'volumes?names=v', { provisioned: 4 * MiB });
    await put('v', 0, new Uint8Array(CHUNK).fill(1));
    await put('v', MiB, new Uint8Array(CHUNK).fill(2));
    await call('POST', 'volume-snapshots?source_names=v', { suffix: 's1' });
    await put('v', 0, new Uint8Array(CHUNK));
    await put('v', 2 * MiB + 10, new Uint8Array(20).fill(3));
    await call('POST', '/data/volumes/v/zeroes', { offset: MiB, length: CHUNK });
    await call('POST', '/data/volumes/v/zeroes', { offset: 3 * MiB, length: CHUNK });
    await call('POST', 'volume-snapshots?source_names=v', { suffix: 's2' });
    await put('v', 3.5 * MiB, new Uint8Array(1).fill(4));
  });
  afterEach(() => mock.close());

  it('answers the changed chunks between a snapshot and the volume, or two snapshots, with unit and size', async () => {
    const now = (await diff('names=v&base_name=v.s1')).body;
    expect(now).toMatchObject({ block_size: CHUNK, provisioned: 4 * MiB, more_items_remaining: false, continuation_token: null });
    expect(now.items).toEqual([
      { offset: 0, length: CHUNK }, { offset: MiB, length: CHUNK }, { offset: 2 * MiB, length: CHUNK }, { offset: 3.5 * MiB, length: CHUNK },
    ]);
    expect((await diff('names=v.s2&base_name=v.s1')).body.items).toEqual(now.items.slice(0, 3));
    expect((await diff('names=v&base_name=v.s2')).body.items).toEqual([{ offset: 3.5 * MiB, length: CHUNK }]);
    expect((await diff('names=v.s1&base_name=v.s1')).body.items).toEqual([]);
    expect((await diff('names=v.s2&base_name=v.s2')).body.items).toEqual([]);
  });

  it('block_size widens the answer to its unit (never finer than the 64 KiB chunk); segments clip it', async () => {
    const wide = (await diff('names=v&base_name=v.s1&block_size=2097152')).body;
    expect(wide).toMatchObject({ block_size: 2 * MiB, items: [{ offset: 0, length: 4 * MiB }] });
    const mid = (await diff('names=v&base_name=v.s1&block_size=131072')).body;
    expect(mid.items).toEqual([
      { offset: 0, length: 128 * KiB }, { offset: MiB, length: 128 * KiB }, { offset: 2 * MiB, length: 128 * KiB }, { offset: 3.5 * MiB, length: 128 * KiB },
    ]);
    expect((await diff('names=v&base_name=v.s1&block_size=512')).body.block_size).toBe(CHUNK);
    const seg = (await diff(`names=v&base_name=v.s1&segment_offset=${MiB + 100}&segment_length=${MiB}`)).body;
    expect(seg.items).toEqual([{ offset: MiB + 100, length: CHUNK - 100 }, { offset: 2 * MiB, length: 100 }]);
    expect((await diff(`names=v&base_name=v.s1&segment_offset=${3 * MiB}`)).body.items).toEqual([{ offset: 3.5 * MiB, length: CHUNK }]);
    expect((await diff(`names=v&base_name=v.s1&segment_offset=${3.5 * MiB + 10}&segment_length=${8 * MiB}`)).body.items)
      .toEqual([{ offset: 3.5 * MiB + 10, length: CHUNK - 10 }]);
    expect((await diff(`names=v&base_name=v.s1&segment_offset=${64 * MiB}`)).body.items).toEqual([]);
    expect((await diff('names=v&base_name=v.s1&segment_length=0')).body.items).toEqual([]);
  });

  it('pages by limit and continuation token (also in x-next-token), and paging survives writes in between', async () => {
    const first = await diff('names=v&base_name=v.s1&limit=1&total_item_count=true');
    expect(first.body).toMatchObject({ items: [{ offset: 0, length: CHUNK }], more_items_remaining: true, total_item_count: 4 });
    expect(first.header).toBe(first.body.continuation_token);
    const seen = [...first.body.items];
    let next = first.body.continuation_token;
    await put('v', 1.5 * MiB, new Uint8Array(1).fill(9)); // lands after the token: the next pages see it
    await put('v', 0, new Uint8Array(1).fill(9)); // lands before it: already answered
    for (let i = 0; next !== null && i < 10; i++) {
      const p = (await diff(`names=v&base_name=v.s1&limit=2&continuation_token=${next}`)).body;
      seen.push(...p.items);
      next = p.continuation_token ?? null;
    }
    expect(next).toBeNull();
    expect(seen.map((r) => r.offset)).toEqual([0, MiB, 1.5 * MiB, 2 * MiB, 3.5 * MiB]);
    // A short page (fault) still hands out a token.
    mock.faults.add({ path: '/api/*/volumes/diff', nth: [1], action: { type: 'short-page', items: 1 } });
    const short = (await diff('names=v&base_name=v.s1')).body;
    expect(short).toMatchObject({ more_items_remaining: true, items: [{ offset: 0 }] });
    expect(short.continuation_token).toEqual(expect.any(String));
  });

  it('refuses unknown names, a base outside the lineage or newer, destroyed snapshots and bad numbers, in the array\'s envelope', async () => {
    await call('POST', 'volumes?names=w', { provisioned: MiB });
    await call('POST', 'volume-snapshots?source_names=w', { suffix: 's1' });
    expect(await refused('names=nope&base_name=v.s1')).toMatchObject({ message: Messages.volumeNotExist, context: 'nope' });
    expect(await refused('names=v.nope&base_name=v.s1')).toMatchObject({ message: Messages.snapshotNotExist, context: 'v.nope' });
    expect(await refused('names=v&base_name=v.nope')).toMatchObject({ message: Messages.snapshotNotExist, context: 'v.nope' });
    expect(await refused('names=v&base_name=w')).toMatchObject({ message: Messages.snapshotNotExist, context: 'w' });
    expect(await refused('names=v&base_name=w.s1')).toMatchObject({ message: Messages.diffBaseLineage, context: 'w.s1' });
    expect(await refused('names=w.s1&base_name=v.s1')).toMatchObject({ message: Messages.diffBaseLineage });
    expect(await refused('names=v.s1&base_name=v.s2')).toMatchObject({ message: Messages.diffBaseNewer, context: 'v.s2' });
    expect(await refused('names=v')).toMatchObject({ context: 'base_name' });
    expect(await refused('base_name=v.s1')).toMatchObject({ context: 'names' });
    expect(await refused('names=v,w&base_name=v.s1')).toMatchObject({ context: 'names' });
    for (const bad of ['block_size=1000', 'block_size=0', `block_size=${2 * 1024 ** 3}`, 'segment_offset=-1', 'segment_length=abc', 'segment_offset=1.5', 'limit=0']) {
      expect((await refused(`names=v&base_name=v.s1&${bad}`)).context, bad).toBe(bad.split('=')[0]);
    }
    expect(await refused('names=v&base_name=v.s1&continuation_token=garbage')).toMatchObject({ message: Messages.invalidToken });
    await call('PATCH', 'volume-snapshots?names=v.s1', { destroyed: true });
    expect(await refused('names=v&base_name=v.s1')).toMatchObject({ message: Messages.snapshotDestroyed });
    await call('PATCH', 'volumes?names=v', { destroyed: true });
    expect(await refused('names=v&base_name=v.s2')).toMatchObject({ message: Messages.volumeDestroyed });
    token = 'stale';
    expect((await call('GET', 'volumes/diff?names=v&base_name=v.s2')).status).toBe(401);
    expect((await fetch(`${mock.url}/api/2.26/volumes/other`, { headers: { 'x-auth-token': token } })).status).toBe(404);
  });
});

describe('flasharray backend: changedExtents over the mock', () => {
  let mock: FlashArrayMock;
  let be: FlashArrayBackend;

  beforeEach(async () => {
    mock = await startFlashArrayMock({ apiToken: 'tok' });
    be = await makeBackend(mock.url, 'tok');
    await be.createVolume({ name: 'v', sizeBytes: 4 * MiB });
    const dev = await be.openVolume('v', 'rw');
    await dev.write(0, new Uint8Array(CHUNK).fill(1));
    await be.createSnapshot('v', 's1');
    await dev.write(MiB + 5, new Uint8Array(10).fill(2));
    await dev.write(3 * MiB, new Uint8Array(CHUNK).fill(3));
    await be.createSnapshot('v', 's2');
    await dev.close();
  });
  afterEach(async () => {
    await be.close();
    await mock.close();
  });

  it('maps the answer to extents, granularity and size; clips to the range', async () => {
    expect(await be.changedExtents('v', { since: 's1' })).toEqual({
      extents: [{ offset: MiB, length: CHUNK }, { offset: 3 * MiB, length: CHUNK }], granularity: CHUNK, sizeBytes: 4 * MiB,
    });
    expect((await be.changedExtents('v', { since: 's1', until: 's2', offset: MiB + 1, length: 2 * MiB })).extents)
      .toEqual([{ offset: MiB + 1, length: CHUNK - 1 }, { offset: 3 * MiB, length: 1 }]);
    expect((await be.changedExtents('v', { since: 's2' })).extents).toEqual([]);
  });

  it('rides out 503s, short pages and a refused continuation token', async () => {
    mock.faults.add({ path: '/api/*/volumes/diff', nth: [1, 2], action: { type: 'status', status: 503 } });
    mock.faults.add({ path: '/api/*/volumes/diff', action: { type: 'short-page', items: 1 } });
    mock.faults.add({ path: '/api/*/volumes/diff', nth: [1], action: { type: 'bad-continuation-token' } });
    const a = await be.changedExtents('v', { since: 's1' });
    expect(a.extents).toEqual([{ offset: MiB, length: CHUNK }, { offset: 3 * MiB, length: CHUNK }]);
    const [status, , badToken] = mock.faults.list();
    expect(status!.fired).toBe(2);
    expect(badToken!.fired).toBe(1);
    // 2 × 503, then page 1, page 2 with a refused token, and the listing again from the start: 2 pages.
    expect(status!.calls).toBe(6);
  });

  it('gives up after the retries with BackendUnavailable', async () => {
    mock.faults.add({ path: '/api/*/volumes/diff', action: { type: 'status', status: 503 } });
    const e = await failure(be.changedExtents('v', { since: 's1' }));
    expect(e.code).toBe('BackendUnavailable');
  });

  it('types the errors: unknown or destroyed snapshot, unknown volume NotFound; until older than since InvalidArgument', async () => {
    expect(await failure(be.changedExtents('v', { since: 'nope' }))).toMatchObject({ code: 'NotFound', ref: 'san/v@nope' });
    expect(await failure(be.changedExtents('v', { since: 's1', until: 'nope' }))).toMatchObject({ code: 'NotFound', ref: 'san/v@nope' });
    expect(await failure(be.changedExtents('ghost', { since: 's1' }))).toMatchObject({ code: 'NotFound', ref: 'san/ghost' });
    expect(await failure(be.changedExtents('ghost', { since: 's1', until: 's2' }))).toMatchObject({ code: 'NotFound', ref: 'san/ghost' });
    expect(await failure(be.changedExtents('bad.name', { since: 's1' }))).toMatchObject({ code: 'NotFound' });
    expect(await failure(be.changedExtents('v', { since: 'bad.name' }))).toMatchObject({ code: 'NotFound' });
    expect(await failure(be.changedExtents('v', { since: 's2', until: 's1' }))).toMatchObject({ code: 'InvalidArgument' });
    expect(await failure(be.changedExtents('v', { since: 's1', offset: -1 }))).toMatchObject({ code: 'InvalidArgument' });
    // A snapshot pending eradication (an interrupted delete) is gone for the broker.
    const login = await fetch(`${mock.url}/api/2.26/login`, { method: 'POST', headers: { 'api-token': 'tok' } });
    await fetch(`${mock.url}/api/2.26/volume-snapshots?names=v.s1`, {
      method: 'PATCH', headers: { 'x-auth-token': login.headers.get('x-auth-token')!, 'content-type': 'application/json' }, body: '{"destroyed":true}',
    });
    expect(await failure(be.changedExtents('v', { since: 's1' }))).toMatchObject({ code: 'NotFound', ref: 'san/v@s1' });
    expect((await be.capabilities()).has('data.dirty')).toBe(true);
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
