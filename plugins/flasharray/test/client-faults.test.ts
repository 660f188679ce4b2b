/**
 * The plugin against scripted HTTP answers (nock): each fault a real array or its gateway can
 * produce, with the number of requests made, what was created, and the final typed error.
 */
import nock from 'nock';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { isOffloadError, type OffloadError } from '../../../core/index.js';
import { Messages } from '../api/messages.js';
import type { Volume } from '../api/schemas.js';
import { makeBackend } from './helpers.js';

const BASE = 'http://array.test';
const API = '/api/2.26';
const MiB = 1024 * 1024;

function vol(name: string, provisioned = MiB, extra: Partial<Volume> = {}): Volume {
  return {
    id: `id-${name}`, name, serial: 'ABCDEF0123456789ABCDEF01', created: 1_700_000_000_000, destroyed: false, time_remaining: null,
    provisioned, source: null, subtype: 'regular', connection_count: 0, space: { virtual: 0, unique: 0 }, ...extra,
  };
}
function snap(volume: string, suffix: string) {
  return {
    id: `id-${volume}.${suffix}`, name: `${volume}.${suffix}`, suffix, serial: 'ABCDEF0123456789ABCDEF02', created: 1_700_000_000_000,
    destroyed: false, time_remaining: null, provisioned: MiB, source: { id: `id-${volume}`, name: volume }, space: {},
  };
}
const list = (items: unknown[], token: string | null = null) => ({
  items, continuation_token: token, more_items_remaining: token !== null, total_item_count: items.length,
});
const arrayError = (message: string, context?: string) => ({ errors: [{ context, message }] });

/** Counts logins; each hands out a new session `S<n>`. */
function login(times = 1) {
  let n = 0;
  const scope = nock(BASE).post(`${API}/login`).matchHeader('api-token', 'tok').times(times)
    .reply(() => { n++; return [200, { items: [{ username: 'pureuser' }] }, { 'x-auth-token': `S${n}` }]; });
  return { scope, count: () => n };
}

async function failure(p: Promise<unknown>): Promise<OffloadError> {
  try {
    await p;
  } catch (e) {
    if (isOffloadError(e)) return e;
    throw e;
  }
  throw new Error('expected a failure');
}

const backend = (extra = {}) => makeBackend(BASE, 'tok', extra);

beforeAll(() => nock.disableNetConnect());
afterEach(() => nock.cleanAll());
afterAll(() => nock.enableNetConnect());

describe('429 rate limiting', () => {
  it('waits per X-RateLimit-* headers, then succeeds', async () => {
    login();
    const calls: number[] = [];
    nock(BASE).get(`${API}/volumes`).query(true).times(3).reply(() => {
      calls.push(Date.now());
      return calls.length < 3
        ? [429, { message: Messages.rateLimited }, { 'X-RateLimit-Limit-second': '10', 'X-RateLimit-Remaining-second': '0', 'X-RateLimit-Limit-minute': '600', 'X-RateLimit-Remaining-minute': '500' }]
        : [200, list([vol('a')])];
    });
    const be = await backend();
    expect((await be.getVolume('a'))?.name).toBe('a');
    expect(calls).toHaveLength(3);
  });

  it('survives a 429 without the headers (backs off instead of crashing)', async () => {
    login();
    let n = 0;
    nock(BASE).get(`${API}/volumes`).query(true).times(2).reply(() => (++n === 1 ? [429, { message: Messages.rateLimited }] : [200, list([vol('a')])]));
    const be = await backend();
    expect((await be.getVolume('a'))?.name).toBe('a');
    expect(n).toBe(2);
  });

  it('honours a spent minute budget (capped by maxRateLimitWaitMs) and Retry-After', async () => {
    login();
    let n = 0;
    nock(BASE).get(`${API}/volumes`).query(true).times(3).reply(() => {
      n++;
      if (n === 1) return [429, { message: Messages.rateLimited }, { 'X-RateLimit-Remaining-second': '3', 'X-RateLimit-Remaining-minute': '0' }];
      if (n === 2) return [429, { message: Messages.rateLimited }, { 'Retry-After': '1' }];
      return [200, list([vol('a')])];
    });
    const be = await backend();
    expect((await be.getVolume('a'))?.name).toBe('a');
    expect(n).toBe(3);
  });

  it('ends in BackendUnavailable after maxAttempts tries', async () => {
    login();
    let n = 0;
    nock(BASE).get(`${API}/volumes`).query(true).times(10).reply(() => { n++; return [429, { message: Messages.rateLimited }]; });
    const be = await backend();
    const e = await failure(be.getVolume('a'));
    expect(e.code).toBe('BackendUnavailable');
    expect(e.message).toMatch(/after 4 tries: rate limited/);
    expect(n).toBe(4);
  });
});

describe('5xx and connection resets', () => {
  it.each([500, 502, 503, 504])('retries %i then succeeds', async (status) => {
    login();
    let n = 0;
    nock(BASE).get(`${API}/volumes`).query(true).times(3).reply(() => (++n < 3 ? [status, { message: 'Bad Gateway' }] : [200, list([vol('a')])]));
    const be = await backend();
    expect((await be.getVolume('a'))?.name).toBe('a');
    expect(n).toBe(3);
  });

  it('gives up with BackendUnavailable naming the last status', async () => {
    login();
    let n = 0;
    nock(BASE).get(`${API}/volumes`).query(true).times(10).reply(() => { n++; return [503, { message: 'Service Unavailable' }]; });
    const be = await backend();
    const e = await failure(be.getVolume('a'));
    expect(e.code).toBe('BackendUnavailable');
    expect(e.message).toMatch(/HTTP 503: Service Unavailable/);
    expect(n).toBe(4);
  });

  it('retries a connection reset', async () => {
    login();
    nock(BASE).get(`${API}/volumes`).query(true).replyWithError({ code: 'ECONNRESET', message: 'socket hang up' });
    const ok = nock(BASE).get(`${API}/volumes`).query(true).reply(200, list([vol('a')]));
    const be = await backend();
    expect((await be.getVolume('a'))?.name).toBe('a');
    expect(ok.isDone()).toBe(true);
  });

  it('resets on every try end in BackendUnavailable', async () => {
    login();
    const scope = nock(BASE).get(`${API}/volumes`).query(true).times(4).replyWithError({ code: 'ECONNRESET', message: 'socket hang up' });
    const be = await backend();
    const e = await failure(be.getVolume('a'));
    expect(e.code).toBe('BackendUnavailable');
    expect(e.message).toMatch(/connection failed/);
    expect(scope.isDone()).toBe(true);
  });

  it('does not retry a 400 from the array', async () => {
    login();
    let n = 0;
    nock(BASE).patch(`${API}/volumes`).query(true).times(5).reply(() => { n++; return [400, arrayError('Something is wrong.', 'v')]; });
    nock(BASE).get(`${API}/volumes`).query(true).reply(200, list([vol('v')]));
    const be = await backend();
    const e = await failure(be.resizeVolume('v', 2 * MiB));
    expect(e.code).toBe('InvalidArgument');
    expect(e.message).toContain('Something is wrong.');
    expect(n).toBe(1);
  });
});

describe('sessions', () => {
  it('logs in once more on 401 and retries the request', async () => {
    const l = login(2);
    const seen: string[] = [];
    nock(BASE).get(`${API}/volumes`).query(true).times(2).reply(function () {
      const token = String(this.req.headers['x-auth-token']);
      seen.push(token);
      return token === 'S1' ? [401, arrayError(Messages.sessionExpired)] : [200, list([vol('a')])];
    });
    const be = await backend();
    expect((await be.getVolume('a'))?.name).toBe('a');
    expect(seen).toEqual(['S1', 'S2']);
    expect(l.count()).toBe(2);
  });

  it('a 401 after re-login is PermissionDenied (no loop)', async () => {
    const l = login(5);
    let n = 0;
    nock(BASE).get(`${API}/volumes`).query(true).times(5).reply(() => { n++; return [401, arrayError(Messages.sessionExpired)]; });
    const be = await backend();
    const e = await failure(be.getVolume('a'));
    expect(e.code).toBe('PermissionDenied');
    expect(n).toBe(2);
    expect(l.count()).toBe(2);
  });

  it('a failed re-login after a 401 is PermissionDenied', async () => {
    nock(BASE).post(`${API}/login`).reply(200, { items: [{ username: 'pureuser' }] }, { 'x-auth-token': 'S1' });
    const relogin = nock(BASE).post(`${API}/login`).reply(401, arrayError(Messages.authFailed));
    const get = nock(BASE).get(`${API}/volumes`).query(true).reply(401, arrayError(Messages.sessionExpired));
    const be = await backend();
    const e = await failure(be.getVolume('a'));
    expect(e.code).toBe('PermissionDenied');
    expect(relogin.isDone() && get.isDone()).toBe(true);
  });

  it('a refused API token is PermissionDenied, and the token never appears in the error', async () => {
    nock(BASE).post(`${API}/login`).reply(401, arrayError(Messages.authFailed));
    const be = await backend();
    const e = await failure(be.getVolume('a'));
    expect(e.code).toBe('PermissionDenied');
    expect(JSON.stringify(e.toJSON()) + e.message).not.toContain('tok"');
    expect(e.hint).toMatch(/apiToken/);
  });

  it('concurrent requests share one login', async () => {
    const l = login(3);
    nock(BASE).get(`${API}/volumes`).query(true).times(3).reply(200, list([vol('a')]));
    const be = await backend();
    await Promise.all([be.getVolume('a'), be.getVolume('a'), be.getVolume('a')]);
    expect(l.count()).toBe(1);
  });
});

describe('lost answers and idempotent create', () => {
  it('a create that timed out but happened is found on retry ("already exists") and returned once', async () => {
    login();
    let posts = 0;
    nock(BASE).post(`${API}/volumes`).query({ names: 'v' }).delay(300).reply(() => { posts++; return [200, list([vol('v')])]; });
    nock(BASE).post(`${API}/volumes`).query({ names: 'v' }).reply(() => { posts++; return [400, arrayError(Messages.volumeExists, 'v')]; });
    const gets = nock(BASE).get(`${API}/volumes`).query(true).reply(200, list([vol('v')]));
    const be = await backend({ timeoutMs: 50 });
    const v = await be.createVolume({ name: 'v', sizeBytes: MiB });
    expect(v).toMatchObject({ name: 'v', sizeBytes: MiB });
    expect(posts).toBe(2);
    expect(gets.isDone()).toBe(true);
  });

  it('"already exists" with another size is AlreadyExists', async () => {
    login();
    nock(BASE).post(`${API}/volumes`).query({ names: 'v' }).reply(400, arrayError(Messages.volumeExists, 'v'));
    nock(BASE).get(`${API}/volumes`).query(true).reply(200, list([vol('v', 2 * MiB)]));
    const be = await backend();
    const e = await failure(be.createVolume({ name: 'v', sizeBytes: MiB }));
    expect(e.code).toBe('AlreadyExists');
    expect(e.ref).toBe('san/v');
  });

  it('timeouts on every try end in Timeout', async () => {
    login();
    const scope = nock(BASE).get(`${API}/volumes`).query(true).times(4).delay(300).reply(200, list([]));
    const be = await backend({ timeoutMs: 30 });
    const e = await failure(be.getVolume('v'));
    expect(e.code).toBe('Timeout');
    expect(scope.isDone()).toBe(true);
  });

  it('a snapshot create whose answer was lost returns the snapshot that exists', async () => {
    login();
    nock(BASE).post(`${API}/volume-snapshots`).query({ source_names: 'v' }).replyWithError({ code: 'ECONNRESET', message: 'reset' });
    nock(BASE).post(`${API}/volume-snapshots`).query({ source_names: 'v' }).reply(400, arrayError(Messages.snapshotExists, 'v.s'));
    nock(BASE).get(`${API}/volume-snapshots`).query(true).reply(200, list([snap('v', 's')]));
    const be = await backend();
    expect(await be.createSnapshot('v', 's')).toMatchObject({ volume: 'v', name: 's' });
  });
});

describe('delete = destroy + eradicate', () => {
  it('deleting a volume the array does not know succeeds without eradicating', async () => {
    login();
    nock(BASE).get(`${API}/volume-snapshots`).query(true).reply(200, list([]));
    nock(BASE).patch(`${API}/volumes`).query({ names: 'v' }).reply(400, arrayError(Messages.volumeNotExist, 'v'));
    const be = await backend();
    await be.deleteVolume('v');
    expect(nock.pendingMocks()).toEqual([]);
  });

  it('"has been destroyed" goes on to eradicate; "does not exist" there is fine', async () => {
    login();
    nock(BASE).get(`${API}/volume-snapshots`).query(true).reply(200, list([]));
    nock(BASE).patch(`${API}/volumes`).query({ names: 'v' }).reply(400, arrayError(Messages.volumeDestroyed, 'v'));
    const del = nock(BASE).delete(`${API}/volumes`).query({ names: 'v' }).reply(400, arrayError(Messages.volumeNotExist, 'v'));
    const be = await backend();
    await be.deleteVolume('v');
    expect(del.isDone()).toBe(true);
  });

  it('a volume with snapshots is FailedPrecondition and nothing is destroyed', async () => {
    login();
    nock(BASE).get(`${API}/volume-snapshots`).query(true).reply(200, list([snap('v', 'a'), snap('v', 'b')]));
    const be = await backend();
    const e = await failure(be.deleteVolume('v'));
    expect(e.code).toBe('FailedPrecondition');
    expect(e.data).toMatchObject({ snapshots: ['a', 'b'] });
    expect(nock.pendingMocks()).toEqual([]); // no PATCH or DELETE was even scripted, and none was sent
  });
});

describe('paging faults', () => {
  const tok = (n: number) => `t${n}`;

  it('follows short pages to the end', async () => {
    login();
    let n = 0;
    nock(BASE).get(`${API}/volume-snapshots`).query(true).times(3).reply((uri) => {
      n++;
      const token = new URL(uri, BASE).searchParams.get('continuation_token');
      if (token === null) return [200, list([snap('v', 'a')], tok(1)), { 'x-next-token': tok(1) }];
      if (token === tok(1)) return [200, list([snap('v', 'b'), snap('v', 'c')], tok(2))];
      return [200, list([snap('v', 'd')])];
    });
    const be = await backend();
    expect((await be.listSnapshots('v')).map((s) => s.name)).toEqual(['a', 'b', 'c', 'd']);
    expect(n).toBe(3);
  });

  it('restarts the listing once when the array refuses its continuation token, without duplicates', async () => {
    login();
    let n = 0;
    nock(BASE).get(`${API}/volume-snapshots`).query(true).times(4).reply((uri) => {
      n++;
      const token = new URL(uri, BASE).searchParams.get('continuation_token');
      if (n === 2) return [400, arrayError(Messages.invalidToken, 'continuation_token')];
      if (token === null) return [200, list([snap('v', 'a')], tok(1))];
      return [200, list([snap('v', 'b')])];
    });
    const be = await backend();
    expect((await be.listSnapshots('v')).map((s) => s.name)).toEqual(['a', 'b']);
    expect(n).toBe(4);
  });

  it('a continuation token that repeats is BackendUnavailable, not an endless loop', async () => {
    login();
    let n = 0;
    nock(BASE).get(`${API}/volume-snapshots`).query(true).times(10).reply(() => { n++; return [200, list([snap('v', 'a')], 'same')]; });
    const be = await backend();
    const e = await failure(be.listSnapshots('v'));
    expect(e.code).toBe('BackendUnavailable');
    expect(e.message).toMatch(/same continuation token/);
    expect(n).toBe(2);
  });

  it('"more items remain" without a token is BackendUnavailable, not a silently short list', async () => {
    login();
    nock(BASE).get(`${API}/volume-snapshots`).query(true).reply(200, { items: [snap('v', 'a')], continuation_token: null, more_items_remaining: true });
    const be = await backend();
    const e = await failure(be.listSnapshots('v'));
    expect(e.code).toBe('BackendUnavailable');
    expect(e.message).toMatch(/more items remain/);
  });

  it('an invalid page token from a caller is InvalidArgument', async () => {
    login();
    nock(BASE).get(`${API}/volumes`).query(true).reply(400, arrayError(Messages.invalidToken, 'continuation_token'));
    const be = await backend();
    const e = await failure(be.listVolumes({ token: 'bogus' }));
    expect(e.code).toBe('InvalidArgument');
    expect(e.hint).toMatch(/list again/);
  });
});

describe('malformed answers', () => {
  it('retries a non-JSON body, then succeeds', async () => {
    login();
    let n = 0;
    nock(BASE).get(`${API}/volumes`).query(true).times(2).reply(() => (++n === 1
      ? [200, '<html><body>Service Temporarily Unavailable</body></html>', { 'content-type': 'text/html' }]
      : [200, list([vol('a')])]));
    const be = await backend();
    expect((await be.getVolume('a'))?.name).toBe('a');
    expect(n).toBe(2);
  });

  it('non-JSON on every try is BackendUnavailable', async () => {
    login();
    const scope = nock(BASE).get(`${API}/volumes`).query(true).times(4).reply(200, '<html>oops</html>', { 'content-type': 'text/html' });
    const be = await backend();
    const e = await failure(be.getVolume('a'));
    expect(e.code).toBe('BackendUnavailable');
    expect(e.message).toMatch(/non-JSON/);
    expect(scope.isDone()).toBe(true);
  });

  it('an answer that does not fit the schema is BackendUnavailable naming the field', async () => {
    login();
    nock(BASE).get(`${API}/volumes`).query(true).reply(200, { items: [{ name: 'a' }] });
    const be = await backend();
    const e = await failure(be.getVolume('a'));
    expect(e.code).toBe('BackendUnavailable');
    expect(e.message).toMatch(/items\.0\.id/);
  });

  it('a 200 carrying an errors body is the error it says, not a success', async () => {
    login();
    nock(BASE).post(`${API}/volumes`).query(true).reply(200, arrayError(Messages.volumeExists, 'v'));
    nock(BASE).get(`${API}/volumes`).query(true).reply(200, list([vol('v', 2 * MiB)]));
    const be = await backend();
    const e = await failure(be.createVolume({ name: 'v', sizeBytes: MiB }));
    expect(e.code).toBe('AlreadyExists');
  });

  it('an API version the array does not serve is Unsupported', async () => {
    nock(BASE).post('/api/2.99/login').reply(404, arrayError(Messages.notFoundPath));
    const be = await backend({ apiVersion: '2.99' });
    const e = await failure(be.getVolume('a'));
    expect(e.code).toBe('Unsupported');
    expect(e.hint).toMatch(/apiVersion/);
  });
});
