/**
 * The plugin against scripted HTTP answers (nock): each fault an ONTAP cluster or the network in
 * front of it can produce, with the number of requests made, what was created, and the final
 * typed error. Every interceptor requires the Basic auth header, so a request without it fails.
 */
import nock from 'nock';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import type { Job, Snapshot, Volume } from '../api/schemas.js';
import { failure, makeBackend } from './helpers.js';

const BASE = 'http://ontap.test';
const AUTH = `Basic ${Buffer.from('admin:netapp123').toString('base64')}`;
const VOLS = '/api/storage/volumes';
const MiB = 1024 * 1024;

const api = () => nock(BASE, { reqheaders: { authorization: AUTH } });
const vol = (name: string, size = MiB, extra: Partial<Volume> = {}): Volume => ({
  uuid: `u-${name}`, name, svm: { name: 'svm0' }, size, create_time: '2026-01-01T00:00:00Z', clone: { is_flexclone: false }, ...extra,
});
const coll = (records: unknown[], next?: string) => ({ records, num_records: records.length, _links: { self: { href: VOLS }, ...(next ? { next: { href: next } } : {}) } });
const accepted = (uuid: string) => [202, { job: { uuid, _links: { self: { href: `/api/cluster/jobs/${uuid}` } } } }] as const;
const job = (uuid: string, state: Job['state'], extra: Partial<Job> = {}): Job => ({ uuid, state, description: 'POST /api/storage/volumes', message: state ?? '', ...extra });
const ontapError = (code: string, message: string, target?: string) => ({ error: { code, message, ...(target ? { target } : {}) } });

/** GET volumes?name=X answers: empty first (not there), then the volume. */
function lookups(name: string, answers: (Volume | undefined)[]) {
  const scope = api();
  for (const a of answers) scope.get(VOLS).query((q) => q.name === name).reply(200, coll(a ? [a] : []));
  return scope;
}

let unmatched: string[] = [];
const onNoMatch = (req: { method?: string; path?: string; options?: { method?: string; path?: string } }) => {
  unmatched.push(`${req.method ?? req.options?.method} ${req.path ?? req.options?.path}`);
};

beforeAll(() => {
  nock.disableNetConnect();
  nock.emitter.on('no match', onNoMatch);
});
beforeEach(() => {
  unmatched = [];
});
afterEach(() => {
  // Nothing scripted left unused, nothing unscripted asked.
  expect(unmatched).toEqual([]);
  expect(nock.pendingMocks()).toEqual([]);
  nock.cleanAll();
});
afterAll(() => {
  nock.emitter.off('no match', onNoMatch);
  nock.enableNetConnect();
});

describe('throttling and transient failures', () => {
  it('429 with Retry-After: waits, retries the POST once, and creates exactly one volume', async () => {
    const look = lookups('v1', [undefined, vol('v1')]);
    let posts = 0;
    api().post(VOLS).times(2).reply(() => (++posts === 1 ? [429, ontapError('429', 'too many requests'), { 'Retry-After': '0.01' }] : accepted('j1')));
    api().get('/api/cluster/jobs/j1').reply(200, job('j1', 'running')).get('/api/cluster/jobs/j1').reply(200, job('j1', 'success'));
    const v = await makeBackend(BASE).createVolume({ name: 'v1', sizeBytes: MiB });
    expect(v).toMatchObject({ name: 'v1', sizeBytes: MiB, backend: 'nas1' });
    expect(posts).toBe(2);
    expect(look.isDone()).toBe(true);
  });

  it('429 without Retry-After: backs off and retries', async () => {
    api().get(VOLS).query(true).reply(429, ontapError('429', 'slow down')).get(VOLS).query(true).reply(200, coll([vol('v1')]));
    expect(await makeBackend(BASE).getVolume('v1')).toMatchObject({ name: 'v1' });
  });

  it('503 then 200 succeeds; 500 on every attempt is BackendUnavailable after exactly maxAttempts requests', async () => {
    api().get(VOLS).query(true).reply(503, ontapError('503', 'service unavailable'), { 'Retry-After': '0' }).get(VOLS).query(true).reply(200, coll([]));
    expect(await makeBackend(BASE).getVolume('v1')).toBeUndefined();

    let n = 0;
    api().get(VOLS).query(true).times(4).reply(() => (n++, [500, ontapError('2', 'internal error')]));
    const e = await failure(makeBackend(BASE, { retry: { maxAttempts: 4, baseDelayMs: 1, maxDelayMs: 5 } }).getVolume('v1'));
    expect(e.code).toBe('BackendUnavailable');
    expect(e.message).toContain('HTTP 500');
    expect(n).toBe(4);
  });

  it('a connection reset is retried', async () => {
    api().get(VOLS).query(true).replyWithError({ code: 'ECONNRESET', message: 'socket hang up' }).get(VOLS).query(true).reply(200, coll([vol('v1')]));
    expect(await makeBackend(BASE).getVolume('v1')).toMatchObject({ name: 'v1' });
  });

  it('resets on every attempt end in BackendUnavailable naming the cause', async () => {
    api().get(VOLS).query(true).times(3).replyWithError({ code: 'ECONNRESET', message: 'socket hang up' });
    const e = await failure(makeBackend(BASE).getVolume('v1'));
    expect(e.code).toBe('BackendUnavailable');
    expect(e.message).toMatch(/connection failed/);
  });

  it('a non-JSON body (a proxy error page) is retried; a persistent one is BackendUnavailable', async () => {
    api().get(VOLS).query(true).reply(200, '<html>gateway</html>', { 'content-type': 'text/html' }).get(VOLS).query(true).reply(200, coll([]));
    expect(await makeBackend(BASE).getVolume('v1')).toBeUndefined();

    api().get(VOLS).query(true).times(3).reply(502, '<html>Bad Gateway</html>', { 'content-type': 'text/html' });
    const e = await failure(makeBackend(BASE).getVolume('v1'));
    expect(e.code).toBe('BackendUnavailable');
  });

  it('wrong credentials are PermissionDenied after one request, with no retry', async () => {
    api().get(VOLS).query(true).reply(401, ontapError('6691623', 'not authorized for that command'));
    const e = await failure(makeBackend(BASE).getVolume('v1'));
    expect(e.code).toBe('PermissionDenied');
    expect(e.hint).toMatch(/password/);
    expect(e.message).not.toContain('netapp123');
  });

  it('a 200 that carries an error object is an error (as Cinder checks)', async () => {
    api().get(VOLS).query(true).reply(200, ontapError('4', "entry doesn't exist"));
    expect((await failure(makeBackend(BASE).listVolumes())).code).toBe('NotFound');
  });

  it('an answer that does not match the schema is an error, not a crash', async () => {
    api().get(VOLS).query(true).reply(200, { records: 'nope' });
    expect((await failure(makeBackend(BASE).getVolume('v1'))).code).toBe('Internal');
  });
});

describe('asynchronous jobs', () => {
  it('a job failure after N polls surfaces as the typed error with the job and ONTAP code', async () => {
    lookups('v1', [undefined]);
    api().post(VOLS).reply(...accepted('j2'));
    api().get('/api/cluster/jobs/j2').times(2).reply(200, job('j2', 'running'));
    api().get('/api/cluster/jobs/j2').reply(200, job('j2', 'failure', { code: 917534, message: 'size too small', error: { code: '917534', message: 'size too small' } }));
    const e = await failure(makeBackend(BASE).createVolume({ name: 'v1', sizeBytes: MiB }));
    expect(e.code).toBe('OutOfRange');
    expect(e.data).toMatchObject({ ontapCode: '917534', jobUuid: 'j2' });
    expect(e.message).toContain('size too small');
  });

  it('an unknown job failure code is FailedPrecondition pointing at the job', async () => {
    lookups('v1', [undefined]);
    api().post(VOLS).reply(...accepted('j3'));
    api().get('/api/cluster/jobs/j3').reply(200, job('j3', 'failure', { code: 13001, error: { code: '13001', message: 'aggregate offline' } }));
    const e = await failure(makeBackend(BASE).createVolume({ name: 'v1', sizeBytes: MiB }));
    expect(e.code).toBe('FailedPrecondition');
    expect(e.hint).toContain('j3');
  });

  it('a job stuck in running past the budget is Timeout naming the job; polling stops', async () => {
    lookups('v1', [undefined]);
    api().post(VOLS).reply(...accepted('j4'));
    let polls = 0;
    api().get('/api/cluster/jobs/j4').times(1000).reply(() => (polls++, [200, job('j4', 'running')]));
    const e = await failure(makeBackend(BASE, { pollBudgetMs: 60 }).createVolume({ name: 'v1', sizeBytes: MiB }));
    expect(e.code).toBe('Timeout');
    expect(e.data).toMatchObject({ jobUuid: 'j4', state: 'running' });
    expect(polls).toBeGreaterThan(1);
    const after = polls;
    await new Promise((r) => setTimeout(r, 50));
    expect(polls).toBe(after);
    nock.cleanAll(); // the unused rest of the 1000 scripted polls
  });

  it('a job GET that 404s (expired) means: look the object up — found is success', async () => {
    lookups('v1', [undefined, vol('v1')]);
    api().post(VOLS).reply(...accepted('j5'));
    api().get('/api/cluster/jobs/j5').reply(404, ontapError('4', "entry doesn't exist", 'uuid'));
    expect(await makeBackend(BASE).createVolume({ name: 'v1', sizeBytes: MiB })).toMatchObject({ name: 'v1' });
  });

  it('an expired job whose object is not there is BackendUnavailable (retry is safe)', async () => {
    lookups('v1', [undefined, undefined]);
    api().post(VOLS).reply(...accepted('j6'));
    api().get('/api/cluster/jobs/j6').reply(404, ontapError('4', "entry doesn't exist", 'uuid'));
    const e = await failure(makeBackend(BASE).createVolume({ name: 'v1', sizeBytes: MiB }));
    expect(e.code).toBe('BackendUnavailable');
    expect(e.message).toContain('j6');
  });

  it('201 within return_timeout needs no polling', async () => {
    lookups('v1', [undefined, vol('v1')]);
    api().post(VOLS).reply(201, { job: { uuid: 'j7', _links: { self: { href: '/api/cluster/jobs/j7' } } } });
    expect(await makeBackend(BASE).createVolume({ name: 'v1', sizeBytes: MiB })).toMatchObject({ name: 'v1' });
  });
});

describe('idempotency', () => {
  it('a POST that timed out but happened: the retry gets duplicate "1", the lookup returns the volume; one create', async () => {
    lookups('v1', [undefined, vol('v1')]);
    let posts = 0;
    api().post(VOLS).delay(300).reply(() => (posts++, accepted('j8')));
    api().post(VOLS).reply(() => (posts++, [409, ontapError('1', 'duplicate entry', 'name')]));
    const v = await makeBackend(BASE, { retry: { maxAttempts: 3, baseDelayMs: 1, maxDelayMs: 5, requestTimeoutMs: 50 } }).createVolume({ name: 'v1', sizeBytes: MiB });
    expect(v).toMatchObject({ name: 'v1', sizeBytes: MiB });
    expect(posts).toBe(2);
  });

  it('duplicate "1" for a volume that differs is AlreadyExists saying how', async () => {
    lookups('v1', [undefined, vol('v1', 2 * MiB)]);
    api().post(VOLS).reply(409, ontapError('1', 'duplicate entry', 'name'));
    const e = await failure(makeBackend(BASE).createVolume({ name: 'v1', sizeBytes: MiB }));
    expect(e.code).toBe('AlreadyExists');
    expect(e.message).toMatch(/size is 2097152/);
  });

  it('busy "524486" is Busy; clone children is FailedPrecondition', async () => {
    lookups('v1', [vol('v1')]);
    api().delete(`${VOLS}/u-v1`).reply(409, ontapError('524486', 'volume busy'));
    expect((await failure(makeBackend(BASE).deleteVolume('v1'))).code).toBe('Busy');
    lookups('v1', [vol('v1')]);
    api().delete(`${VOLS}/u-v1`).reply(409, ontapError('917640', 'volume has FlexClone children'));
    expect((await failure(makeBackend(BASE).deleteVolume('v1'))).code).toBe('FailedPrecondition');
  });

  it('delete of a volume that is gone makes no DELETE request', async () => {
    lookups('v1', [undefined]);
    await makeBackend(BASE).deleteVolume('v1');
  });
});

describe('paging', () => {
  const snap = (name: string): Snapshot => ({ uuid: `s-${name}`, name, logical_size: MiB });
  const snaps = `${VOLS}/u-v1/snapshots`;

  it('follows _links.next through short pages (return_timeout truncation) to the end', async () => {
    lookups('v1', [vol('v1')]);
    api()
      .get(snaps).query(true).reply(200, { records: [snap('a')], num_records: 1, _links: { next: { href: `${snaps}?start.uuid=s-a&fields=create_time` } } })
      .get(snaps).query({ 'start.uuid': 's-a', fields: 'create_time' }).reply(200, { records: [], num_records: 0, _links: { next: { href: `${snaps}?start.uuid=s-a2` } } })
      .get(snaps).query({ 'start.uuid': 's-a2' }).reply(200, { records: [snap('b'), snap('c')], num_records: 2, _links: {} });
    const list = await makeBackend(BASE).listSnapshots('v1');
    expect(list.map((s) => s.name)).toEqual(['a', 'b', 'c']);
  });

  it('a next link that repeats a page is refused instead of looping', async () => {
    lookups('v1', [vol('v1')]);
    const loop = `${snaps}?start.uuid=s-a`;
    api().get(snaps).query(true).times(2).reply(200, { records: [snap('a')], num_records: 1, _links: { next: { href: loop } } });
    const e = await failure(makeBackend(BASE).listSnapshots('v1'));
    expect(e.code).toBe('Internal');
    expect(e.message).toMatch(/repeats/);
  });

  it('listVolumes hands out the next link as an opaque token and follows it; a forged token is InvalidArgument', async () => {
    const next = `${VOLS}?svm.name=svm0&max_records=1&start.uuid=u-a`;
    api().get(VOLS).query({ 'svm.name': 'svm0', max_records: '1', fields: /.*/ }).reply(200, coll([vol('a')], next));
    api().get(VOLS).query({ 'svm.name': 'svm0', max_records: '1', 'start.uuid': 'u-a' }).reply(200, coll([vol('b')]));
    const be = makeBackend(BASE);
    const p1 = await be.listVolumes({ limit: 1 });
    expect(p1.items.map((v) => v.name)).toEqual(['a']);
    const p2 = await be.listVolumes({ limit: 1, token: p1.next! });
    expect(p2.items.map((v) => v.name)).toEqual(['b']);
    expect(p2.next).toBeUndefined();
    const forged = Buffer.from('/api/cluster/jobs?x=1').toString('base64url');
    expect((await failure(be.listVolumes({ token: forged }))).code).toBe('InvalidArgument');
    const otherSvm = Buffer.from(`${VOLS}?svm.name=other`).toString('base64url');
    expect((await failure(be.listVolumes({ token: otherSvm }))).code).toBe('InvalidArgument');
  });
});

describe('a snapshot\'s data path', () => {
  it('openSnapshot: a snapshot listed without logical_size takes its size from the data plane, and is read by its uuid', async () => {
    lookups('v', [vol('v', 2 * MiB)]);
    api().get(`${VOLS}/u-v/snapshots`).query((q) => q.name === 's1').reply(200, coll([{ uuid: 'snap-1', name: 's1' }]));
    api().get('/data/volumes/u-v/extents').query({ 'snapshot.uuid': 'snap-1', offset: '0', length: '0' }).reply(200, { size: MiB, extents: [] });
    api().get('/data/volumes/u-v').query({ 'snapshot.uuid': 'snap-1' }).matchHeader('range', 'bytes=4-7').reply(206, Buffer.from('abcd'));
    const snap = await makeBackend(BASE).openSnapshot('v', 's1');
    expect(snap.sizeBytes).toBe(MiB);
    expect(Buffer.from(await snap.read(4, 4)).toString()).toBe('abcd');
    expect((await failure(snap.read(MiB - 1, 2))).code).toBe('OutOfRange');
  });
});
