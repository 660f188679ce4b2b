/**
 * The flasharray plugin against the mock array with its fault injector: each fault on a real
 * loopback server, then the array's state is checked directly — nothing duplicated, nothing
 * leaked, data intact.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { startFlashArrayMock, type FlashArrayMock } from '../../plugins/flasharray/appliance/index.js';
import type { FlashArrayBackend } from '../../plugins/flasharray/backend.js';
import type { FaultRuleInput } from '../../plugins/flasharray/appliance/faults.js';
import { makeBackend, pattern } from '../../plugins/flasharray/test/helpers.js';

const MiB = 1024 * 1024;

/** What the array holds, read with plain HTTP (destroyed objects included). */
async function arrayState(mock: FlashArrayMock): Promise<{ volumes: string[]; snapshots: string[]; destroyed: string[] }> {
  const login = await fetch(`${mock.url}/api/2.26/login`, { method: 'POST', headers: { 'api-token': mock.apiToken } });
  const headers = { 'x-auth-token': login.headers.get('x-auth-token')! };
  const get = async (r: string) => ((await (await fetch(`${mock.url}/api/2.26/${r}`, { headers })).json()) as { items: { name: string; destroyed: boolean }[] }).items;
  const vols = await get('volumes');
  const snaps = await get('volume-snapshots');
  return {
    volumes: vols.filter((v) => !v.destroyed).map((v) => v.name),
    snapshots: snaps.filter((s) => !s.destroyed).map((s) => s.name),
    destroyed: [...vols, ...snaps].filter((o) => o.destroyed).map((o) => o.name),
  };
}

describe('flasharray plugin vs injected faults on the mock', () => {
  let mock: FlashArrayMock;
  let be: FlashArrayBackend;
  const fault = (...rules: FaultRuleInput[]) => mock.faults.add(...rules);
  const fired = () => mock.faults.list().map((r) => r.fired);

  beforeEach(async () => {
    mock = await startFlashArrayMock({ apiToken: 'tok' });
    be = await makeBackend(mock.url, 'tok', { timeoutMs: 200 });
  });
  afterEach(async () => {
    await be.close();
    await mock.close();
  });

  it('a create whose answer is lost to a reset after the array did it yields one volume', async () => {
    fault({ method: 'POST', path: '/api/*/volumes', nth: [1], action: { type: 'reset', afterProcessing: true } });
    expect(await be.createVolume({ name: 'v1', sizeBytes: MiB })).toMatchObject({ name: 'v1', sizeBytes: MiB });
    expect(fired()).toEqual([1]);
    expect(await arrayState(mock)).toEqual({ volumes: ['v1'], snapshots: [], destroyed: [] });
  });

  it('an answer delayed past the client timeout (the change happened) yields one snapshot and one copy', async () => {
    await be.createVolume({ name: 'v', sizeBytes: MiB });
    fault({ method: 'POST', path: '/api/*/volume-snapshots', nth: [1], action: { type: 'late', ms: 400 } });
    fault({ method: 'POST', path: '/api/*/volumes', nth: [1], action: { type: 'late', ms: 400 } });
    expect(await be.createSnapshot('v', 's')).toMatchObject({ volume: 'v', name: 's' });
    expect(await be.createVolume({ name: 'c', source: { volume: 'v', snapshot: 's' } })).toMatchObject({ name: 'c' });
    expect(fired()).toEqual([1, 1]);
    expect(await arrayState(mock)).toEqual({ volumes: ['c', 'v'], snapshots: ['v.s'], destroyed: [] });
  });

  it('a reset before the array acts is retried; delete still ends with nothing left', async () => {
    await be.createVolume({ name: 'v', sizeBytes: MiB });
    fault({ method: 'PATCH', path: '/api/*/volumes', nth: [1], action: { type: 'reset' } });
    fault({ method: 'DELETE', path: '/api/*/volumes', nth: [1], action: { type: 'reset', afterProcessing: true } });
    await be.deleteVolume('v');
    expect(fired()).toEqual([1, 1]);
    expect(await arrayState(mock)).toEqual({ volumes: [], snapshots: [], destroyed: [] });
  });

  it('a revoked session is re-established once and the work goes on', async () => {
    await be.createVolume({ name: 'v', sizeBytes: MiB });
    fault({ path: '/api/**', nth: [1], action: { type: 'revoke-token' } });
    await be.createSnapshot('v', 's');
    expect((await be.listSnapshots('v')).map((s) => s.name)).toEqual(['s']);
  });

  it('429s (with and without X-RateLimit headers) and 5xx on the data plane are retried; data is intact', async () => {
    await be.createVolume({ name: 'd', sizeBytes: 4 * MiB });
    const dev = await be.openVolume('d', 'rw');
    fault({ method: 'PUT', path: '/data/volumes/*', nth: [1], action: { type: 'status', status: 429 } });
    fault({ method: 'PUT', path: '/data/volumes/*', nth: [2], action: { type: 'status', status: 429, rateLimitHeaders: false } });
    fault({ method: 'GET', path: '/data/volumes/*', nth: [1, 2], action: { type: 'status', status: 503 } });
    const data = pattern(200_000, 4);
    await dev.write(4096, data);
    expect(Buffer.from(await dev.read(4096, data.length)).equals(data)).toBe(true);
    expect(fired()).toEqual([1, 1, 2]);
  });

  it('short pages and a refused continuation token still list every item exactly once', async () => {
    await be.createVolume({ name: 'v', sizeBytes: MiB });
    for (const s of ['a', 'b', 'c', 'd', 'e']) await be.createSnapshot('v', s);
    fault({ method: 'GET', path: '/api/*/volume-snapshots', action: { type: 'short-page', items: 2 } });
    fault({ method: 'GET', path: '/api/*/volume-snapshots', nth: [2], action: { type: 'bad-continuation-token' } });
    expect((await be.listSnapshots('v')).map((s) => s.name)).toEqual(['a', 'b', 'c', 'd', 'e']);
    const [short, bad] = mock.faults.list();
    expect(bad!.fired).toBe(1);
    expect(short!.fired).toBeGreaterThanOrEqual(4); // 3 pages, restarted once after the refusal
  });

  it('a non-JSON answer is retried; one that persists is BackendUnavailable', async () => {
    fault({ method: 'GET', path: '/api/*/volumes', nth: [1], action: { type: 'non-json', status: 200 } });
    expect(await be.getVolume('nope')).toBeUndefined();
    fault({ method: 'GET', path: '/api/*/volumes', action: { type: 'non-json', status: 502 } });
    await expect(be.getVolume('nope')).rejects.toMatchObject({ code: 'BackendUnavailable' });
  });

  it('latency within the timeout is just slower', async () => {
    fault({ path: '/api/*/volumes', action: { type: 'latency', ms: 30 } });
    await be.createVolume({ name: 'slow', sizeBytes: MiB });
    expect((await be.getVolume('slow'))?.name).toBe('slow');
  });

  it('faults can be set through POST /_admin/faults and read back with counters', async () => {
    const set = await fetch(`${mock.url}/_admin/faults`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ seed: 7, rules: [{ method: 'GET', path: '/api/*/volumes', nth: [1], action: { type: 'status', status: 503 } }] }),
    });
    expect(set.status).toBe(200);
    expect(await be.getVolume('x')).toBeUndefined();
    const state = (await (await fetch(`${mock.url}/_admin/faults`)).json()) as { rules: { calls: number; fired: number }[] };
    expect(state.rules).toEqual([expect.objectContaining({ calls: 2, fired: 1 })]);
    const bad = await fetch(`${mock.url}/_admin/faults`, { method: 'POST', body: JSON.stringify({ rules: [{ action: { type: 'explode' } }] }) });
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { errors: { message: string }[] }).errors[0]!.message).toMatch(/Invalid fault config/);
    expect((await fetch(`${mock.url}/_admin/faults`, { method: 'DELETE' })).status).toBe(200);
    expect(mock.faults.list()).toEqual([]);
  });

  it('retries that run out end in the typed error, and nothing was created', async () => {
    fault({ method: 'POST', path: '/api/*/volumes', action: { type: 'status', status: 503 } });
    await expect(be.createVolume({ name: 'never', sizeBytes: MiB })).rejects.toMatchObject({ code: 'BackendUnavailable' });
    expect(mock.faults.list()[0]!.fired).toBe(4);
    mock.faults.clear();
    fault({ method: 'GET', path: '/api/*/volumes', action: { type: 'late', ms: 400 } });
    await expect(be.getVolume('never')).rejects.toMatchObject({ code: 'Timeout' });
    mock.faults.clear();
    expect(await arrayState(mock)).toEqual({ volumes: [], snapshots: [], destroyed: [] });
  });
});

describe('a seeded storm of faults', () => {
  it('the same workload under random faults ends in exactly the expected array state', async () => {
    const mock = await startFlashArrayMock({
      apiToken: 'tok',
      faults: {
        seed: 42,
        rules: [
          { path: '/api/**', probability: 0.1, action: { type: 'status', status: 503 } },
          { method: 'POST', path: '/api/**', probability: 0.1, action: { type: 'reset', afterProcessing: true } },
          { method: 'PATCH', path: '/api/**', probability: 0.1, action: { type: 'late', ms: 150 } },
          { probability: 0.05, action: { type: 'status', status: 429, rateLimitHeaders: false } },
          { path: '/api/**', probability: 0.03, action: { type: 'revoke-token' } },
          { method: 'GET', path: '/api/**', probability: 0.3, action: { type: 'short-page', items: 1 } },
        ],
      },
    });
    const be = await makeBackend(mock.url, 'tok', { timeoutMs: 100, retry: { maxAttempts: 10, baseDelayMs: 1, maxDelayMs: 4, maxRateLimitWaitMs: 4 } });
    try {
      for (let i = 0; i < 6; i++) await be.createVolume({ name: `v${i}`, sizeBytes: MiB });
      const dev = await be.openVolume('v0', 'rw');
      await dev.write(0, pattern(100_000, 1));
      for (let i = 0; i < 6; i += 2) await be.createSnapshot(`v${i}`, 'snap');
      await be.createVolume({ name: 'copy', source: { volume: 'v0', snapshot: 'snap' }, sizeBytes: 2 * MiB });
      await be.resizeVolume('v1', 3 * MiB);
      await be.deleteSnapshot('v2', 'snap');
      for (const v of ['v2', 'v3']) await be.deleteVolume(v);
      const fired = mock.faults.list().reduce((n, r) => n + r.fired, 0);
      expect(fired).toBeGreaterThan(5); // the storm did blow
      mock.faults.clear();
      expect(await arrayState(mock)).toEqual({ volumes: ['copy', 'v0', 'v1', 'v4', 'v5'], snapshots: ['v0.snap', 'v4.snap'], destroyed: [] });
      expect((await be.getVolume('v1'))?.sizeBytes).toBe(3 * MiB);
      expect((await be.getVolume('copy'))?.sizeBytes).toBe(2 * MiB);
      const copy = await be.openVolume('copy', 'r');
      expect(Buffer.from(await copy.read(0, 100_000)).equals(pattern(100_000, 1))).toBe(true);
    } finally {
      await be.close();
      await mock.close();
    }
  });
});
