/**
 * The mock array as a client sees it over plain HTTP: paths, envelopes, error strings, sessions,
 * the destroy/eradicate life cycle, thin copies — and every answer validated against the shared
 * zod schemas the plugin parses with.
 */
import { mkdtemp, readdir, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { z } from 'zod';
import { Messages } from '../api/messages.js';
import { ApiVersions, DataExtents, ErrorEnvelope, GatewayError, LoginResponse, VolumeList, VolumeSnapshotList } from '../api/schemas.js';
import { startFlashArrayMock, type FlashArrayMock } from '../appliance/index.js';

const MiB = 1024 * 1024;

class Curl {
  token = '';
  constructor(private readonly mock: FlashArrayMock, private readonly v = '2.26') {}
  async login(): Promise<Response> {
    const r = await fetch(`${this.mock.url}/api/${this.v}/login`, { method: 'POST', headers: { 'api-token': this.mock.apiToken } });
    this.token = r.headers.get('x-auth-token') ?? '';
    return r;
  }
  call(method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<Response> {
    const url = path.startsWith('/') ? `${this.mock.url}${path}` : `${this.mock.url}/api/${this.v}/${path}`;
    const init: RequestInit = { method, headers: { 'x-auth-token': this.token, ...headers } };
    if (body instanceof Uint8Array) init.body = body;
    else if (body !== undefined) {
      init.body = JSON.stringify(body);
      (init.headers as Record<string, string>)['content-type'] = 'application/json';
    }
    return fetch(url, init);
  }
}

/** Parse an answer with a shared schema (strictly: the parse must succeed). */
async function as<T extends z.ZodType>(schema: T, r: Response, status = 200): Promise<z.infer<T>> {
  expect(r.status).toBe(status);
  return schema.parse(await r.json());
}

async function apiError(r: Response, status = 400): Promise<{ message: string; context?: string | null }> {
  const env = await as(ErrorEnvelope, r, status);
  return env.errors[0]!;
}

describe('mock FlashArray REST 2.x', () => {
  let mock: FlashArrayMock;
  let c: Curl;

  beforeEach(async () => {
    mock = await startFlashArrayMock({ sessionTtlMs: 60_000, eradicationDelayMs: 60_000 });
    c = new Curl(mock);
    await c.login();
  });
  afterEach(() => mock.close());

  it('api_version, login and logout', async () => {
    const versions = await as(ApiVersions, await fetch(`${mock.url}/api/api_version`));
    expect(versions.version).toContain('2.26');
    const r = await c.login();
    expect((await as(LoginResponse, r)).items[0]!.username).toBe('pureuser');
    expect(c.token).toMatch(/.{16,}/);
    const bad = await fetch(`${mock.url}/api/2.26/login`, { method: 'POST', headers: { 'api-token': 'wrong' } });
    expect((await apiError(bad, 401)).message).toBe(Messages.authFailed);
    expect((await c.call('POST', 'logout')).status).toBe(200);
    expect((await apiError(await c.call('GET', 'volumes'), 401)).message).toBe(Messages.sessionExpired);
    c.token = 'made-up';
    expect((await c.call('GET', 'volumes')).status).toBe(401);
    expect((await fetch(`${mock.url}/api/1.19/volumes`)).status).toBe(404);
    expect((await c.call('GET', '/nothing/here')).status).toBe(404);
  });

  it('sessions expire after the idle TTL', async () => {
    const short = await startFlashArrayMock({ sessionTtlMs: 40 });
    try {
      const s = new Curl(short);
      await s.login();
      expect((await s.call('GET', 'volumes')).status).toBe(200);
      await new Promise((r) => setTimeout(r, 80));
      expect((await apiError(await s.call('GET', 'volumes'), 401)).message).toBe(Messages.sessionExpired);
    } finally {
      await short.close();
    }
  });

  it('create, list envelopes, names, filter, limit, continuation tokens', async () => {
    for (const n of ['b', 'a', 'c', 'd']) {
      const v = await as(VolumeList, await c.call('POST', `volumes?names=${n}`, { provisioned: MiB }));
      expect(v.items[0]).toMatchObject({ name: n, provisioned: MiB, destroyed: false, time_remaining: null, source: null });
      expect(v.items[0]!.serial).toMatch(/^[0-9A-F]{24}$/);
    }
    expect((await apiError(await c.call('POST', 'volumes?names=a', { provisioned: MiB }))).message).toBe(Messages.volumeExists);
    const page1 = await c.call('GET', 'volumes?limit=3&total_item_count=true');
    const p1 = await as(VolumeList, page1);
    expect(p1.items.map((v) => v.name)).toEqual(['a', 'b', 'c']);
    expect(p1).toMatchObject({ more_items_remaining: true, total_item_count: 4 });
    expect(page1.headers.get('x-next-token')).toBe(p1.continuation_token);
    const p2 = await as(VolumeList, await c.call('GET', `volumes?limit=3&continuation_token=${p1.continuation_token}`));
    expect(p2).toMatchObject({ more_items_remaining: false, continuation_token: null, total_item_count: null });
    expect(p2.items.map((v) => v.name)).toEqual(['d']);
    const e = await apiError(await c.call('GET', 'volumes?continuation_token=not-a-token'));
    expect(e.message).toBe(Messages.invalidToken);
    expect((await as(VolumeList, await c.call('GET', 'volumes?names=c,a'))).items.map((v) => v.name)).toEqual(['a', 'c']);
    expect(await apiError(await c.call('GET', 'volumes?names=a,zz'))).toEqual({ context: 'zz', message: Messages.volumeNotExist });
    expect((await as(VolumeList, await c.call('GET', `volumes?filter=${encodeURIComponent("name='a*' and name='b'")}`))).items).toEqual([]);
    expect((await as(VolumeList, await c.call('GET', `volumes?filter=${encodeURIComponent("name='[ab]*'")}`))).items).toEqual([]);
    expect((await as(VolumeList, await c.call('GET', `volumes?filter=${encodeURIComponent("name!='a' and provisioned='1048576'")}`))).items.map((v) => v.name)).toEqual(['b', 'c', 'd']);
    expect((await apiError(await c.call('GET', 'volumes?filter=%28%28'))).message).toMatch(/Invalid filter/);
    expect((await apiError(await c.call('GET', 'volumes?limit=0'))).context).toBe('limit');
  });

  it('paging under churn lists every volume that stays exactly once', async () => {
    const stay = ['b1', 'b3', 'b5', 'b7', 'b9'];
    for (const n of [...stay, 'b2', 'b4']) await c.call('POST', `volumes?names=${n}`, { provisioned: MiB });
    const seen: string[] = [];
    let token: string | null | undefined;
    let round = 0;
    do {
      const p = await as(VolumeList, await c.call('GET', `volumes?limit=2${token ? `&continuation_token=${token}` : ''}`));
      seen.push(...p.items.map((v) => v.name));
      token = p.continuation_token;
      // between pages: others come and go, before and after the cursor
      round++;
      await c.call('POST', `volumes?names=a${round}`, { provisioned: MiB });
      await c.call('POST', `volumes?names=z${round}`, { provisioned: MiB });
      if (round === 1) {
        await c.call('PATCH', 'volumes?names=b4', { destroyed: true });
        await c.call('DELETE', 'volumes?names=b4');
      }
    } while (token);
    for (const n of stay) expect(seen.filter((x) => x === n)).toHaveLength(1);
    expect(new Set(seen).size).toBe(seen.length);
    expect(seen).not.toContain('b4');
  });

  it('refuses bad names and sizes with the array messages', async () => {
    for (const bad of ['has.dot', '-x', 'x'.repeat(64), 'sp ace']) {
      expect((await apiError(await c.call('POST', `volumes?names=${encodeURIComponent(bad)}`, { provisioned: MiB }))).message).toBe(Messages.invalidName);
    }
    for (const size of [0, 1000, -512, 5 * 1024 ** 5]) {
      expect((await apiError(await c.call('POST', 'volumes?names=v', { provisioned: size }))).message).toBe(Messages.invalidSize);
    }
    expect((await apiError(await c.call('POST', 'volumes?names=v', { provisioned: MiB, bogus: 1 }))).message).toBe(Messages.badRequest);
    const r = await fetch(`${mock.url}/api/2.26/volumes?names=v`, { method: 'POST', headers: { 'x-auth-token': c.token, 'content-type': 'application/json' }, body: '{not json' });
    expect((await apiError(r)).message).toBe(Messages.badRequest);
  });

  it('resize needs truncate to shrink; truncated data does not come back when grown again', async () => {
    await c.call('POST', 'volumes?names=v', { provisioned: 2 * MiB });
    await c.call('PUT', '/data/volumes/v', Buffer.alloc(1000, 7), { 'content-range': `bytes ${MiB + 100}-${MiB + 1099}/*` });
    expect((await apiError(await c.call('PATCH', 'volumes?names=v', { provisioned: MiB }))).message).toBe(Messages.truncation);
    expect((await as(VolumeList, await c.call('PATCH', 'volumes?names=v&truncate=true', { provisioned: MiB + 512 }))).items[0]!.provisioned).toBe(MiB + 512);
    await as(VolumeList, await c.call('PATCH', 'volumes?names=v', { provisioned: 2 * MiB }));
    const r = await c.call('GET', '/data/volumes/v', undefined, { range: `bytes=${MiB}-${MiB + 2047}` });
    const bytes = Buffer.from(await r.arrayBuffer());
    expect(bytes.subarray(100, 512).every((b) => b === 7)).toBe(true);
    expect(bytes.subarray(512).every((b) => b === 0)).toBe(true);
  });

  it('destroy, time_remaining, re-create blocked until eradicated, recover, eradicate', async () => {
    await c.call('POST', 'volumes?names=v', { provisioned: MiB });
    await c.call('POST', 'volume-snapshots?source_names=v', { suffix: 's' });
    expect((await apiError(await c.call('DELETE', 'volumes?names=v'))).message).toBe(Messages.notDestroyed);
    const d = await as(VolumeList, await c.call('PATCH', 'volumes?names=v', { destroyed: true }));
    expect(d.items[0]!.destroyed).toBe(true);
    expect(d.items[0]!.time_remaining).toBeGreaterThan(0);
    expect((await apiError(await c.call('PATCH', 'volumes?names=v', { destroyed: true }))).message).toBe(Messages.volumeDestroyed);
    expect((await apiError(await c.call('POST', 'volumes?names=v', { provisioned: MiB }))).message).toContain('has been destroyed');
    const snaps = await as(VolumeSnapshotList, await c.call('GET', 'volume-snapshots'));
    expect(snaps.items[0]).toMatchObject({ name: 'v.s', destroyed: true });
    expect((await as(VolumeList, await c.call('GET', 'volumes?destroyed=false'))).items).toEqual([]);
    // recover brings the snapshots back too
    await as(VolumeList, await c.call('PATCH', 'volumes?names=v', { destroyed: false }));
    expect((await as(VolumeSnapshotList, await c.call('GET', 'volume-snapshots?destroyed=false'))).items.map((s) => s.name)).toEqual(['v.s']);
    await c.call('PATCH', 'volumes?names=v', { destroyed: true });
    expect((await c.call('DELETE', 'volumes?names=v')).status).toBe(200);
    expect((await apiError(await c.call('DELETE', 'volumes?names=v'))).message).toBe(Messages.volumeNotExist);
    expect((await as(VolumeSnapshotList, await c.call('GET', 'volume-snapshots'))).items).toEqual([]);
    await as(VolumeList, await c.call('POST', 'volumes?names=v', { provisioned: MiB }));
  });

  it('the array eradicates destroyed volumes itself once time_remaining runs out', async () => {
    const quick = await startFlashArrayMock({ eradicationDelayMs: 30 });
    try {
      const q = new Curl(quick);
      await q.login();
      await q.call('POST', 'volumes?names=v', { provisioned: MiB });
      await q.call('PATCH', 'volumes?names=v', { destroyed: true });
      await new Promise((r) => setTimeout(r, 60));
      expect((await as(VolumeList, await q.call('GET', 'volumes'))).items).toEqual([]);
      await as(VolumeList, await q.call('POST', 'volumes?names=v', { provisioned: MiB }));
    } finally {
      await quick.close();
    }
  });

  it('snapshots: suffix naming, generated suffixes, copies and overwrite', async () => {
    await c.call('POST', 'volumes?names=v', { provisioned: MiB });
    const s = await as(VolumeSnapshotList, await c.call('POST', 'volume-snapshots?source_names=v', { suffix: 'one' }));
    expect(s.items[0]).toMatchObject({ name: 'v.one', suffix: 'one', source: { name: 'v' }, provisioned: MiB });
    expect((await as(VolumeSnapshotList, await c.call('POST', 'volume-snapshots?source_names=v', {}))).items[0]!.name).toBe('v.1');
    expect((await apiError(await c.call('POST', 'volume-snapshots?source_names=v', { suffix: 'one' }))).message).toBe(Messages.snapshotExists);
    expect((await apiError(await c.call('POST', 'volume-snapshots?source_names=nope', { suffix: 'x' }))).message).toBe(Messages.volumeNotExist);
    expect((await as(VolumeSnapshotList, await c.call('GET', 'volume-snapshots?source_names=v'))).items.map((x) => x.name)).toEqual(['v.1', 'v.one']);
    const copy = await as(VolumeList, await c.call('POST', 'volumes?names=w', { source: { name: 'v.one' } }));
    expect(copy.items[0]!.source).toMatchObject({ name: 'v.one' });
    expect((await apiError(await c.call('POST', 'volumes?names=w2', { source: { name: 'v.nope' } }))).message).toBe(Messages.noSuchSource);
    expect((await apiError(await c.call('POST', 'volumes?names=ghost&overwrite=true', { source: { name: 'v.one' } }))).message).toBe(Messages.volumeNotExist);
    await as(VolumeList, await c.call('POST', 'volumes?names=w&overwrite=true', { source: { name: 'v.1' } }));
    await as(VolumeSnapshotList, await c.call('PATCH', 'volume-snapshots?names=v.one', { destroyed: true }));
    expect((await apiError(await c.call('PATCH', 'volume-snapshots?names=v.one', { destroyed: true }))).message).toBe(Messages.snapshotDestroyed);
    expect((await c.call('DELETE', 'volume-snapshots?names=v.one')).status).toBe(200);
    expect((await apiError(await c.call('DELETE', 'volume-snapshots?names=v.one'))).message).toBe(Messages.snapshotNotExist);
  });

  it('gateway-style 429 and 503 bodies fit the gateway schema', async () => {
    mock.faults.add({ path: '/api/*/volumes', nth: [1], action: { type: 'status', status: 429 } });
    mock.faults.add({ path: '/api/*/volumes', nth: [2], action: { type: 'status', status: 503 } });
    const r429 = await c.call('GET', 'volumes');
    expect(r429.headers.get('x-ratelimit-remaining-second')).toBe('0');
    expect((await as(GatewayError, r429, 429)).message).toBe(Messages.rateLimited);
    await as(GatewayError, await c.call('GET', 'volumes'), 503);
  });

  it('data plane: ranges, content-range, extents', async () => {
    await c.call('POST', 'volumes?names=d', { provisioned: MiB });
    expect((await c.call('PUT', '/data/volumes/d', Buffer.from('abc'), { 'content-range': 'bytes 10-12/*' })).status).toBe(204);
    expect((await c.call('PUT', '/data/volumes/d', Buffer.from('abcd'), { 'content-range': 'bytes 10-12/*' })).status).toBe(413);
    expect((await c.call('PUT', '/data/volumes/d', Buffer.from('ab'), { 'content-range': 'bytes 10-12/*' })).status).toBe(400);
    expect((await c.call('PUT', '/data/volumes/d', Buffer.from('abc'))).status).toBe(400);
    expect((await c.call('PUT', '/data/volumes/d', Buffer.from('abc'), { 'content-range': `bytes ${MiB - 1}-${MiB + 1}/*` })).status).toBe(416);
    const r = await c.call('GET', '/data/volumes/d', undefined, { range: 'bytes=9-13' });
    expect(r.status).toBe(206);
    expect(r.headers.get('content-range')).toBe(`bytes 9-13/${MiB}`);
    expect(Buffer.from(await r.arrayBuffer())).toEqual(Buffer.from([0, 97, 98, 99, 0]));
    expect((await c.call('GET', '/data/volumes/d', undefined, { range: `bytes=0-${MiB}` })).status).toBe(416);
    expect((await c.call('POST', '/data/volumes/d/zeroes', { offset: 65536, length: 131072 })).status).toBe(204);
    const ext = await as(DataExtents, await c.call('GET', '/data/volumes/d/extents'));
    expect(ext).toEqual({ size: MiB, extents: [{ offset: 0, length: 65536, kind: 'data' }, { offset: 65536, length: 131072, kind: 'zero' }] });
    const part = await as(DataExtents, await c.call('GET', '/data/volumes/d/extents?offset=5&length=10'));
    expect(part.extents).toEqual([{ offset: 5, length: 10, kind: 'data' }]);
    c.token = 'x';
    expect((await c.call('GET', '/data/volumes/d')).status).toBe(401);
  });
});

describe('thin copies on disk', () => {
  it('snapshots and copies share chunks until written (copy-on-write)', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'fa-thin-'));
    const mock = await startFlashArrayMock({ stateDir: dir });
    try {
      const c = new Curl(mock);
      await c.login();
      const chunks = async () => (await readdir(join(dir, 'chunks'))).length;
      await c.call('POST', 'volumes?names=v', { provisioned: 4 * MiB });
      await c.call('PUT', '/data/volumes/v', Buffer.alloc(MiB, 1), { 'content-range': `bytes 0-${MiB - 1}/*` });
      const base = await chunks();
      expect(base).toBe(16);
      await c.call('POST', 'volume-snapshots?source_names=v', { suffix: 's' });
      await c.call('POST', 'volumes?names=w', { source: { name: 'v' } });
      expect(await chunks()).toBe(base);
      await c.call('PUT', '/data/volumes/w', Buffer.alloc(10, 2), { 'content-range': 'bytes 0-9/*' });
      expect(await chunks()).toBe(base + 1);
      // Overwriting v's chunk keeps the snapshot's old chunk: one more.
      await c.call('PUT', '/data/volumes/v', Buffer.alloc(10, 3), { 'content-range': 'bytes 0-9/*' });
      expect(await chunks()).toBe(base + 2);
      const snap = await c.call('GET', '/data/volumes/v.s', undefined, { range: 'bytes=0-9' });
      expect(Buffer.from(await snap.arrayBuffer())).toEqual(Buffer.alloc(10, 1));
      const vols = await as(VolumeList, await c.call('GET', 'volumes?names=w'));
      expect(vols.items[0]!.space).toMatchObject({ virtual: MiB, unique: 65536 });
    } finally {
      await mock.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('mock state folder', () => {
  it('a folder saved before the appliance kit (chunk files named N.chunk) still loads', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'fa-old-'));
    try {
      let mock = await startFlashArrayMock({ stateDir: dir });
      let c = new Curl(mock);
      await c.login();
      await c.call('POST', 'volumes?names=v', { provisioned: MiB });
      await c.call('PUT', '/data/volumes/v', Buffer.alloc(1000, 5), { 'content-range': 'bytes 0-999/*' });
      await mock.close();
      for (const f of await readdir(join(dir, 'chunks'))) await rename(join(dir, 'chunks', f), join(dir, 'chunks', `${f}.chunk`));
      mock = await startFlashArrayMock({ stateDir: dir });
      c = new Curl(mock);
      await c.login();
      const got = await c.call('GET', '/data/volumes/v', undefined, { range: 'bytes=0-999' });
      expect(Buffer.from(await got.arrayBuffer())).toEqual(Buffer.alloc(1000, 5));
      await mock.close();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('a damaged state file is Corrupt, with what to do', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'fa-bad-'));
    try {
      await writeFile(join(dir, 'array.json'), '{"version":1,"volu');
      await expect(startFlashArrayMock({ stateDir: dir })).rejects.toMatchObject({ code: 'Corrupt', hint: expect.stringMatching(/move the state folder/) });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
