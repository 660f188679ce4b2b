/** The common actions over real HTTP, in their documented order; the admin endpoint; body limits. */
import { afterEach, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { answerWithFaults, defineFaultGrammar, faultAdmin, HttpError, parseJson, readBody, sendReply, serveHttp, shortPageOf, type HttpService, type Reply } from '../index.js';

const grammar = defineFaultGrammar({
  statusFields: { note: z.string().optional() },
  actions: [z.strictObject({ type: z.literal('refuse') }), z.strictObject({ type: z.literal('mark') })],
});
type Action = z.output<typeof grammar.Action>;

let service: HttpService | undefined;
afterEach(async () => {
  await service?.close();
  service = undefined;
});

/** A tiny mock: echoes the body it handled and the short page it was asked for; counts what it handled. */
async function mock() {
  const faults = grammar.injector();
  const handled: string[] = [];
  const marks: string[] = [];
  const safely = async (fn: () => Promise<Reply>): Promise<Reply> => {
    try {
      return await fn();
    } catch (e) {
      if (e instanceof HttpError) return { status: e.status, body: { error: e.message } };
      throw e;
    }
  };
  service = await serveHttp(async (req, res) => {
    const url = new URL(req.url ?? '/', 'http://mock.invalid');
    if (url.pathname.startsWith('/_admin/')) return sendReply(res, await safely(() => faultAdmin(faults, req, url)));
    const fired = faults.pick(req.method ?? 'GET', url);
    await answerWithFaults<Action>({
      req, res, fired,
      status: (a) => ({ status: a.status, body: { injected: a.status, note: a.note ?? null } }),
      before: (a) => {
        if (a.type === 'mark') marks.push(url.pathname);
        return a.type === 'refuse' ? { status: 400, body: { refused: true } } : undefined;
      },
      handle: () => safely(async () => {
        const body = parseJson(await readBody(req, 16));
        handled.push(url.pathname);
        return { status: 200, body: { body: body ?? null, page: shortPageOf(fired) ?? null } };
      }),
    });
  }, { port: 0, host: '127.0.0.1', crash: () => ({ status: 500, body: { crashed: true } }) });
  return { faults, handled, marks, url: service.url };
}

const timed = async <T>(fn: () => Promise<T>): Promise<[T, number]> => {
  const t = Date.now();
  const v = await fn();
  return [v, Date.now() - t];
};

describe('answering under faults', () => {
  it('status and non-json answer instead of handling; latency waits first', async () => {
    const m = await mock();
    m.faults.configure({ rules: [
      { path: '/s', action: { type: 'latency', ms: 60 } },
      { path: '/s', action: { type: 'status', status: 503, note: 'busy' } },
      { path: '/h', action: { type: 'non-json', status: 200 } },
    ] });
    const [r, ms] = await timed(() => fetch(`${m.url}/s`, { method: 'POST', body: '{"a":1}' }));
    expect(ms).toBeGreaterThanOrEqual(55);
    expect(r.status).toBe(503);
    expect(await r.json()).toEqual({ injected: 503, note: 'busy' });
    const h = await fetch(`${m.url}/h`);
    expect(h.status).toBe(200);
    expect(h.headers.get('content-type')).toBe('text/html');
    expect(await h.text()).toContain('<html>');
    expect(m.handled).toEqual([]);
  });

  it('reset drops the connection before handling, or after it with afterProcessing', async () => {
    const m = await mock();
    m.faults.configure({ rules: [
      { path: '/before', action: { type: 'reset' } },
      { path: '/after', action: { type: 'reset', afterProcessing: true } },
    ] });
    await expect(fetch(`${m.url}/before`)).rejects.toThrow();
    await expect(fetch(`${m.url}/after`)).rejects.toThrow();
    expect(m.handled).toEqual(['/after']);
  });

  it('late handles at once and answers after the wait; short-page reaches the handler', async () => {
    const m = await mock();
    m.faults.configure({ rules: [{ path: '/l', action: { type: 'late', ms: 60 } }, { path: '/l', action: { type: 'short-page', items: 3 } }] });
    const [r, ms] = await timed(() => fetch(`${m.url}/l`, { method: 'POST', body: '[1]' }));
    expect(ms).toBeGreaterThanOrEqual(55);
    expect(await r.json()).toEqual({ body: [1], page: 3 });
    expect(m.handled).toEqual(['/l']);
  });

  it("the mock's own actions act before the common ones, and may answer instead", async () => {
    const m = await mock();
    m.faults.configure({ rules: [
      { path: '/x', action: { type: 'mark' } },
      { path: '/x', nth: [1], action: { type: 'refuse' } },
      { path: '/x', action: { type: 'status', status: 500 } },
    ] });
    const r = await fetch(`${m.url}/x`);
    expect([r.status, await r.json()]).toEqual([400, { refused: true }]);
    expect((await fetch(`${m.url}/x`)).status).toBe(500);
    expect(m.marks).toEqual(['/x', '/x']);
  });

  it("a body over the limit is 413, one that is not JSON 400 (in the mock's own envelope)", async () => {
    const m = await mock();
    const big = await fetch(`${m.url}/b`, { method: 'POST', body: 'x'.repeat(17) });
    expect([big.status, await big.json()]).toEqual([413, { error: 'the request body is larger than 16 bytes' }]);
    const bad = await fetch(`${m.url}/b`, { method: 'POST', body: '{' });
    expect([bad.status, await bad.json()]).toEqual([400, { error: 'the request body is not valid JSON' }]);
  });
});

describe('/_admin/faults', () => {
  it('POST replaces (or appends), GET lists with counters, DELETE clears; bad rules are 400 naming the field', async () => {
    const m = await mock();
    const admin = async (method: string, body?: unknown, query = '') => {
      const r = await fetch(`${m.url}/_admin/faults${query}`, { method, ...(body === undefined ? {} : { body: JSON.stringify(body) }) });
      return { status: r.status, json: (await r.json()) as { seed: number; rules: { id: number; calls: number; fired: number }[]; error?: string } };
    };
    expect((await admin('POST', { seed: 7, rules: [{ path: '/y', nth: [2], action: { type: 'status', status: 502 } }] })).status).toBe(200);
    expect((await admin('POST', { seed: 8, rules: [{ path: '/z', action: { type: 'mark' } }] }, '?append=true')).json.rules.map((r) => r.id)).toEqual([1, 2]);
    expect((await fetch(`${m.url}/y`)).status).toBe(200);
    expect((await fetch(`${m.url}/y`)).status).toBe(502);
    const listed = await admin('GET');
    expect(listed.json.seed).toBe(7);
    expect(listed.json.rules[0]).toMatchObject({ id: 1, path: '/y', calls: 2, fired: 1 });
    const bad = await admin('POST', { rules: [{ action: { type: 'explode' } }] });
    expect(bad.status).toBe(400);
    expect(bad.json.error).toMatch(/^Invalid fault config: rules\.0\.action\.type: /);
    expect((await admin('GET')).json.rules).toHaveLength(2);
    expect((await admin('DELETE')).json).toEqual({ seed: 7, rules: [] });
    expect((await admin('PUT', {})).status).toBe(405);
    expect((await fetch(`${m.url}/_admin/other`)).status).toBe(404);
  });
});
