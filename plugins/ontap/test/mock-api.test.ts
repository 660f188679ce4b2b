/**
 * The mock appliance driven with plain fetch, the way curl would: create → 202 + job → poll →
 * success; FlexClone; split; `_links.next` paging; every answer validated against the shared
 * zod schemas the client uses.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { ZodType } from 'zod';
import { Collection, ErrorBody, ExtentList, Job, JobLinkResponse, Snapshot, Volume } from '../api/schemas.js';
import { startOntapMock, type OntapMock, type OntapMockOptions } from '../appliance/server.js';

const MiB = 1024 * 1024;
let mocks: OntapMock[] = [];
const dirs: string[] = [];

async function start(opts: OntapMockOptions = {}): Promise<OntapMock> {
  const m = await startOntapMock({ port: 0, jobDurationMs: 20, ...opts });
  mocks.push(m);
  return m;
}

afterEach(async () => {
  for (const m of mocks) await m.close();
  mocks = [];
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** A tiny curl: Basic auth, JSON in and out, the answer validated against a schema. */
function curl(m: OntapMock, auth = `${m.username}:${m.password}`) {
  const headers = { authorization: `Basic ${Buffer.from(auth).toString('base64')}` };
  return async <T>(method: string, path: string, schema: ZodType<T> | null, body?: unknown, extra: Record<string, string> = {}) => {
    const res = await fetch(m.url + path, {
      method,
      headers: { ...headers, ...extra, ...(body !== undefined && !(body instanceof Uint8Array) ? { 'content-type': 'application/json' } : {}) },
      body: body instanceof Uint8Array ? body : body === undefined ? undefined : JSON.stringify(body),
    });
    const text = Buffer.from(await res.arrayBuffer());
    const json = text.length && (res.headers.get('content-type') ?? '').includes('json') ? JSON.parse(text.toString()) : undefined;
    if (schema && res.status < 300) {
      const r = schema.safeParse(json);
      if (!r.success) throw new Error(`${method} ${path}: answer does not match the schema: ${r.error.message}\n${text}`);
    }
    if (res.status >= 400 && json !== undefined) expect(ErrorBody.safeParse(json).success, `${method} ${path} error body`).toBe(true);
    return { status: res.status, json: json as T, raw: text, headers: res.headers };
  };
}

async function pollJob(c: ReturnType<typeof curl>, uuid: string): Promise<Job[]> {
  const seen: Job[] = [];
  for (let i = 0; i < 2000; i++) {
    const { json } = await c('GET', `/api/cluster/jobs/${uuid}`, Job);
    seen.push(json);
    if (json.state === 'success' || json.state === 'failure') return seen;
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error(`job ${uuid} did not end`);
}

async function volumeUuid(c: ReturnType<typeof curl>, name: string): Promise<string> {
  const { json } = await c('GET', `/api/storage/volumes?name=${name}`, Collection(Volume));
  return json.records[0]!.uuid;
}

describe('the mock appliance, as curl drives it', () => {
  it('create → 202 + job → poll (queued/running → success) → the volume is listed', async () => {
    const m = await start();
    const c = curl(m);
    const created = await c('POST', '/api/storage/volumes', JobLinkResponse, { name: 'vol1', svm: { name: 'svm0' }, size: 8 * MiB });
    expect(created.status).toBe(202);
    const states = (await pollJob(c, created.json.job.uuid)).map((j) => j.state);
    expect(states[states.length - 1]).toBe('success');
    expect(states.every((s) => ['queued', 'running', 'success'].includes(s!))).toBe(true);
    const list = await c('GET', '/api/storage/volumes?fields=size,svm', Collection(Volume));
    expect(list.json.records).toEqual([expect.objectContaining({ name: 'vol1', size: 8 * MiB, svm: { name: 'svm0' } })]);
    expect(list.json.records[0]).not.toHaveProperty('clone'); // fields= selects
  });

  it('answers 401 with an ONTAP error on bad credentials and validates request bodies', async () => {
    const m = await start();
    expect((await curl(m, 'admin:wrong')('GET', '/api/storage/volumes', null)).status).toBe(401);
    const c = curl(m);
    const bad = await c('POST', '/api/storage/volumes', null, { name: 'x', svm: { name: 'svm0' }, size: 'big' });
    expect(bad.status).toBe(400);
    expect((bad.json as unknown as ErrorBody).error.target).toBe('size');
    expect((await c('POST', '/api/storage/volumes', null, { name: 'x', svm: { name: 'nosvm' }, size: 1 })).status).toBe(400);
  });

  it('duplicate name is code "1"; unknown volume is code "4"', async () => {
    const m = await start();
    const c = curl(m);
    await c('POST', '/api/storage/volumes', JobLinkResponse, { name: 'dup', svm: { name: 'svm0' }, size: MiB });
    const again = await c('POST', '/api/storage/volumes', null, { name: 'dup', svm: { name: 'svm0' }, size: MiB });
    expect(again.status).toBe(409);
    expect((again.json as unknown as ErrorBody).error.code).toBe('1');
    const missing = await c('GET', '/api/storage/volumes/no-such-uuid', null);
    expect(missing.status).toBe(404);
    expect((missing.json as unknown as ErrorBody).error.code).toBe('4');
  });

  it('return_timeout: done within it answers 201 without polling', async () => {
    const m = await start();
    const r = await curl(m)('POST', '/api/storage/volumes?return_timeout=10', JobLinkResponse, { name: 'quick', svm: { name: 'svm0' }, size: MiB });
    expect(r.status).toBe(201);
  });

  it('FlexClone shares data instantly; protections; split copies the shared data with progress; then the parent can go', async () => {
    const m = await start({ splitBytesPerSecond: 8 * MiB });
    const c = curl(m);
    await c('POST', '/api/storage/volumes?return_timeout=5', JobLinkResponse, { name: 'gold', svm: { name: 'svm0' }, size: 8 * MiB });
    const gold = await volumeUuid(c, 'gold');
    const data = Buffer.alloc(2 * MiB, 0xab);
    expect((await c('PUT', `/data/volumes/${gold}`, null, data, { 'content-range': `bytes 0-${data.length - 1}/*` })).status).toBe(204);
    await c('POST', `/api/storage/volumes/${gold}/snapshots?return_timeout=5`, JobLinkResponse, { name: 'base' });
    const storedBefore = m.appliance.store.storedBytes;
    const clone = await c('POST', '/api/storage/volumes', JobLinkResponse, {
      name: 'vm1', svm: { name: 'svm0' }, clone: { is_flexclone: true, parent_volume: { name: 'gold' }, parent_snapshot: { name: 'base' } },
    });
    await pollJob(c, clone.json.job.uuid);
    expect(m.appliance.store.storedBytes).toBe(storedBefore); // thin: nothing copied
    const vm1 = await volumeUuid(c, 'vm1');
    const info = await c('GET', `/api/storage/volumes/${vm1}?fields=clone,size`, Volume);
    expect(info.json.clone).toMatchObject({ is_flexclone: true, parent_volume: { name: 'gold' }, parent_snapshot: { name: 'base' } });
    const read = await c('GET', `/data/volumes/vm1`, null, undefined, { range: 'bytes=0-15' });
    expect(read.status).toBe(206);
    expect(read.raw).toEqual(data.subarray(0, 16));

    // The parent and its snapshot are protected while the clone depends on them.
    expect((await c('DELETE', `/api/storage/volumes/${gold}`, null)).status).toBe(409);
    const snaps = await c('GET', `/api/storage/volumes/${gold}/snapshots`, Collection(Snapshot));
    expect((await c('DELETE', `/api/storage/volumes/${gold}/snapshots/${snaps.json.records[0]!.uuid}`, null)).status).toBe(409);

    const split = await c('PATCH', `/api/storage/volumes/${vm1}`, JobLinkResponse, { clone: { split_initiated: true } });
    expect(split.status).toBe(202);
    const percents: number[] = [];
    for (;;) {
      const v = await c('GET', `/api/storage/volumes/${vm1}?fields=clone`, Volume);
      if (!v.json.clone?.is_flexclone) break;
      if (v.json.clone.split_complete_percent !== undefined) percents.push(v.json.clone.split_complete_percent);
      await new Promise((r) => setTimeout(r, 10));
    }
    const jobs = await pollJob(c, split.json.job.uuid);
    expect(jobs[jobs.length - 1]!.state).toBe('success');
    expect(percents.length).toBeGreaterThan(1); // 2 MiB at 8 MiB/s: several observations
    expect([...percents].sort((a, b) => a - b)).toEqual(percents);
    expect(m.appliance.store.storedBytes).toBe(storedBefore + data.length); // the clone now owns a copy
    expect((await c('DELETE', `/api/storage/volumes/${gold}?return_timeout=5`, null)).status).toBe(200);
    expect((await c('GET', `/data/volumes/vm1`, null, undefined, { range: `bytes=0-${data.length - 1}` })).raw.equals(data)).toBe(true);
  });

  it('pages with max_records and _links.next; a shortPage fault truncates and still links next', async () => {
    const m = await start();
    const c = curl(m);
    for (let i = 0; i < 5; i++) await c('POST', '/api/storage/volumes', JobLinkResponse, { name: `p${i}`, svm: { name: 'svm0' }, size: MiB });
    const walk = async () => {
      const names: string[] = [];
      const pages: number[] = [];
      let href: string | undefined = '/api/storage/volumes?max_records=2&svm.name=svm0';
      while (href) {
        const r: { json: { records: { name: string }[]; _links?: { next?: { href: string } } } } = await c('GET', href, Collection(Volume));
        names.push(...r.json.records.map((v) => v.name));
        pages.push(r.json.records.length);
        href = r.json._links?.next?.href;
      }
      return { names, pages };
    };
    const full = await walk();
    expect(full.names.sort()).toEqual(['p0', 'p1', 'p2', 'p3', 'p4']);
    expect(full.pages).toEqual([2, 2, 1]);
    m.faults.add({ method: 'GET', path: '/api/storage/volumes', nth: [1], action: { type: 'short-page', items: 1 } });
    const short = await walk();
    expect(short.names.sort()).toEqual(['p0', 'p1', 'p2', 'p3', 'p4']);
    expect(short.pages).toEqual([1, 2, 2]);
  });

  it('data plane: extents list only what was written; ranges outside the volume are 416', async () => {
    const m = await start();
    const c = curl(m);
    await c('POST', '/api/storage/volumes', JobLinkResponse, { name: 'd', svm: { name: 'svm0' }, size: 4 * MiB });
    await c('PUT', '/data/volumes/d', null, Buffer.alloc(1000, 1), { 'content-range': `bytes ${MiB}-${MiB + 999}/*` });
    const ext = await c('GET', '/data/volumes/d/extents', ExtentList);
    expect(ext.json.extents).toHaveLength(1);
    expect(ext.json.extents[0]!.offset).toBeLessThanOrEqual(MiB);
    expect(ext.json.extents[0]!.offset + ext.json.extents[0]!.length).toBeGreaterThanOrEqual(MiB + 1000);
    expect((await c('GET', '/data/volumes/d', null, undefined, { range: `bytes=${4 * MiB}-` })).status).toBe(416);
    expect((await c('PUT', '/data/volumes/d', null, Buffer.alloc(10), { 'content-range': `bytes ${4 * MiB - 5}-${4 * MiB + 4}/*` })).status).toBe(416);
  });

  it('jobs disappear after the expiry; injected failure, stuck, and expired jobs behave as configured', async () => {
    const m = await start({ jobExpiryMs: 50 });
    const c = curl(m);
    const ok = await c('POST', '/api/storage/volumes', JobLinkResponse, { name: 'e1', svm: { name: 'svm0' }, size: MiB });
    await pollJob(c, ok.json.job.uuid);
    let gone = 0;
    for (let i = 0; i < 500 && gone !== 404; i++) {
      gone = (await c('GET', `/api/cluster/jobs/${ok.json.job.uuid}`, null)).status;
      await new Promise((r) => setTimeout(r, 5));
    }
    expect(gone).toBe(404);

    m.faults.add({ method: 'POST', path: '/api/storage/volumes', nth: [1], action: { type: 'job-failure', afterPolls: 3, code: '13001', message: 'aggregate offline' } });
    const failing = await c('POST', '/api/storage/volumes', JobLinkResponse, { name: 'f1', svm: { name: 'svm0' }, size: MiB });
    const polls = await pollJob(c, failing.json.job.uuid);
    expect(polls.length).toBeGreaterThanOrEqual(3);
    expect(polls[polls.length - 1]).toMatchObject({ state: 'failure', code: 13001, error: { code: '13001', message: 'aggregate offline' } });
    expect((await c('GET', '/api/storage/volumes?name=f1', Collection(Volume))).json.records).toEqual([]); // nothing changed

    m.faults.add({ method: 'POST', path: '/api/storage/volumes', nth: [1], action: { type: 'job-stuck' } });
    const stuck = await c('POST', '/api/storage/volumes', JobLinkResponse, { name: 's1', svm: { name: 'svm0' }, size: MiB });
    await new Promise((r) => setTimeout(r, 60));
    expect((await c('GET', `/api/cluster/jobs/${stuck.json.job.uuid}`, Job)).json.state).toBe('running');
    expect((await c('PATCH', `/api/cluster/jobs/${stuck.json.job.uuid}?action=cancel`, null)).status).toBe(200);
    expect((await c('GET', `/api/cluster/jobs/${stuck.json.job.uuid}`, Job)).json.state).toBe('failure');

    m.faults.add({ method: 'POST', path: '/api/storage/volumes', nth: [1], action: { type: 'job-expired' } });
    const vanished = await c('POST', '/api/storage/volumes', JobLinkResponse, { name: 'x1', svm: { name: 'svm0' }, size: MiB });
    expect((await c('GET', `/api/cluster/jobs/${vanished.json.job.uuid}`, null)).status).toBe(404);
    expect((await c('GET', '/api/storage/volumes?name=x1', Collection(Volume))).json.records).toHaveLength(1); // the work happened
  });

  it('transport faults: 429 with Retry-After, 503, reset, non-JSON; admin endpoint lists and clears rules', async () => {
    const m = await start();
    const c = curl(m);
    const set = (await c('POST', '/_admin/faults', null, { rules: [
      { method: 'GET', path: '/api/storage/volumes', nth: [1], action: { type: 'status', status: 429, retryAfter: 2 } },
      { method: 'GET', path: '/api/storage/volumes', nth: [2], action: { type: 'status', status: 503 } },
      { method: 'GET', path: '/api/storage/volumes', nth: [3], action: { type: 'non-json' } },
      { method: 'GET', path: '/api/storage/volumes', nth: [4], action: { type: 'reset' } },
    ] })).json as unknown as { rules: { id: number }[] };
    expect(set.rules.map((r) => r.id)).toHaveLength(4);
    const r1 = await c('GET', '/api/storage/volumes', null);
    expect(r1.status).toBe(429);
    expect(r1.headers.get('retry-after')).toBe('2');
    expect((await c('GET', '/api/storage/volumes', null)).status).toBe(503);
    const r3 = await c('GET', '/api/storage/volumes', null);
    expect(r3.status).toBe(502);
    expect(r3.raw.toString()).toContain('<html>');
    await expect(c('GET', '/api/storage/volumes', null)).rejects.toThrow();
    expect((await c('GET', '/api/storage/volumes', Collection(Volume))).status).toBe(200);
    const listed = (await c('GET', '/_admin/faults', null)).json as unknown as { rules: { fired: number }[] };
    expect(listed.rules.map((r) => r.fired)).toEqual([1, 1, 1, 1]);
    await c('DELETE', '/_admin/faults', null);
    expect(((await c('GET', '/_admin/faults', null)).json as unknown as { rules: unknown[] }).rules).toEqual([]);
    expect((await c('POST', '/_admin/faults', null, { rules: [{ action: { type: 'nope' } }] })).status).toBe(400);
  });

  it('a seeded probabilistic fault replays identically', async () => {
    const pattern = async () => {
      const m = await start({ faults: { seed: 42, rules: [{ method: 'GET', path: '/api/cluster', probability: 0.5, action: { type: 'status', status: 503 } }] } });
      const c = curl(m);
      const out: number[] = [];
      for (let i = 0; i < 16; i++) out.push((await c('GET', '/api/cluster', null)).status);
      return out;
    };
    const a = await pattern();
    expect(a).toContain(503);
    expect(a).toContain(200);
    expect(await pattern()).toEqual(a);
  });

  it('state persists in the state directory across a restart (atomic files)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'ontap-state-'));
    dirs.push(dir);
    const m1 = await start({ stateDir: dir });
    const c1 = curl(m1);
    await c1('POST', '/api/storage/volumes?return_timeout=5', JobLinkResponse, { name: 'keep', svm: { name: 'svm0' }, size: 2 * MiB });
    await c1('PUT', '/data/volumes/keep', null, Buffer.from('persisted bytes'), { 'content-range': 'bytes 4096-4110/*' });
    const v = await volumeUuid(c1, 'keep');
    await c1('POST', `/api/storage/volumes/${v}/snapshots?return_timeout=5`, JobLinkResponse, { name: 'snap1' });
    await m1.close();
    mocks = mocks.filter((x) => x !== m1);

    const m2 = await start({ stateDir: dir });
    const c2 = curl(m2);
    expect(await volumeUuid(c2, 'keep')).toBe(v);
    expect((await c2('GET', '/data/volumes/keep', null, undefined, { range: 'bytes=4096-4110' })).raw.toString()).toBe('persisted bytes');
    const snaps = await c2('GET', `/api/storage/volumes/${v}/snapshots`, Collection(Snapshot));
    expect(snaps.json.records.map((s) => s.name)).toEqual(['snap1']);
  });
});
