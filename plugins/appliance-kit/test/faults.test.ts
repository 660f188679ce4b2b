/** The one fault grammar: matching, how nth / probability / times combine, seeded draws, errors that name the field, vendor actions. */
import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import { defineFaultGrammar, seededRandom, streamSeed } from '../index.js';

const grammar = defineFaultGrammar({
  statusFields: { retryAfter: z.number().nonnegative().optional() },
  actions: [z.strictObject({ type: z.literal('revoke-token') }), z.strictObject({ type: z.literal('bad-token') })],
  sees: (a, u) => a.type !== 'bad-token' || u.searchParams.has('token'),
});
const url = (path: string) => new URL(path, 'http://mock.invalid');
/** Which of `n` calls to `path` fire (1-based). */
function firing(injector: ReturnType<typeof grammar.injector>, n: number, method = 'GET', path = '/api/x'): number[] {
  const out: number[] = [];
  for (let i = 1; i <= n; i++) if (injector.pick(method, url(path)).length > 0) out.push(i);
  return out;
}
function issues(input: unknown): string[] {
  const r = grammar.FaultConfig.safeParse(input);
  return r.success ? [] : r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`);
}

describe('fault rules', () => {
  it('defaults: any method, any path, every call; the common actions get their defaults', () => {
    const parsed = grammar.Rule.parse({ action: { type: 'non-json' } });
    expect(parsed).toEqual({ method: '*', path: '/**', action: { type: 'non-json', status: 502 } });
    expect(grammar.Action.parse({ type: 'reset' })).toEqual({ type: 'reset', afterProcessing: false });
    expect(grammar.Action.parse({ type: 'short-page' })).toEqual({ type: 'short-page', items: 1 });
    expect(grammar.FaultConfig.parse({})).toEqual({ seed: 1, rules: [] });
    const f = grammar.injector();
    f.add({ action: { type: 'latency', ms: 1 } });
    expect(firing(f, 3, 'DELETE', '/a/b/c')).toEqual([1, 2, 3]);
  });

  it('`*` matches within one path segment, `**` across segments; methods match in any case', () => {
    const f = grammar.injector();
    f.configure({ rules: [
      { method: 'get', path: '/api/*/volumes', action: { type: 'reset' } },
      { path: '/data/**', action: { type: 'late', ms: 1 } },
    ] });
    expect(f.pick('GET', url('/api/2.26/volumes'))).toHaveLength(1);
    expect(f.pick('GET', url('/api/2.26/x/volumes'))).toHaveLength(0);
    expect(f.pick('POST', url('/api/2.26/volumes'))).toHaveLength(0);
    expect(f.pick('PUT', url('/data/volumes/v/extents?offset=0'))).toEqual([{ type: 'late', ms: 1 }]);
    expect(f.pick('PUT', url('/data'))).toHaveLength(0);
    expect(f.list().map((r) => r.calls)).toEqual([1, 1]);
  });

  it('nth, times and probability all have to hold; a draw is taken only when the others do', () => {
    const f = grammar.injector();
    f.add({ nth: [2, 4, 5], times: 2, action: { type: 'reset' } });
    expect(firing(f, 6)).toEqual([2, 4]);
    expect(f.list()[0]).toMatchObject({ calls: 6, fired: 2 });

    // nth and probability together: of the calls nth names, those whose draw is under probability.
    const both = grammar.injector();
    both.configure({ seed: 9, rules: [{ nth: [1, 2, 3, 4, 5, 6, 7, 8], probability: 0.5, action: { type: 'reset' } }] });
    const fired = firing(both, 20);
    const draws = seededRandomFor(9, 1, 8);
    expect(fired).toEqual(draws.flatMap((d, i) => (d < 0.5 ? [i + 1] : [])));
    expect(fired.length).toBeGreaterThan(0);
    expect(fired.length).toBeLessThan(8);
  });

  it('same seed, same rules, same calls: the same faults; each rule draws from its own stream', () => {
    const schedule = (seed: number, withOther: boolean) => {
      const f = grammar.injector();
      f.configure({ seed, rules: [{ path: '/a', probability: 0.3, action: { type: 'reset' } }] });
      if (withOther) f.add({ path: '/b', probability: 0.9, action: { type: 'reset' } });
      const out: number[] = [];
      for (let i = 1; i <= 40; i++) {
        if (withOther) f.pick('GET', url('/b'));
        if (f.pick('GET', url('/a')).length) out.push(i);
      }
      return out;
    };
    expect(schedule(42, false)).toEqual(schedule(42, false));
    expect(schedule(42, true)).toEqual(schedule(42, false)); // another rule's draws do not move this one's
    expect(schedule(43, false)).not.toEqual(schedule(42, false));
  });

  it('configure replaces (ids from 1), append and add keep the seed; clear and remove', () => {
    const f = grammar.injector();
    f.configure({ seed: 5, rules: [{ action: { type: 'reset' } }] });
    expect(f.add({ action: { type: 'revoke-token' } })).toEqual([2]);
    expect(f.append({ seed: 99, rules: [{ action: { type: 'bad-token' } }] })).toEqual([3]);
    expect(f.seed).toBe(5);
    expect(f.remove(2)).toBe(true);
    expect(f.remove(2)).toBe(false);
    expect(f.list().map((r) => r.id)).toEqual([1, 3]);
    f.clear();
    expect(f.list()).toEqual([]);
    expect(f.add({ action: { type: 'reset' } })).toEqual([1]);
  });

  it("a mock's own actions and status fields join the one grammar; `sees` limits which calls a rule counts", () => {
    expect(grammar.Action.parse({ type: 'status', status: 429, retryAfter: 2 })).toEqual({ type: 'status', status: 429, retryAfter: 2 });
    const f = grammar.injector();
    f.add({ nth: [2], action: { type: 'bad-token' } });
    expect(f.pick('GET', url('/x'))).toEqual([]);
    expect(f.pick('GET', url('/x?token=1'))).toEqual([]);
    expect(f.pick('GET', url('/x'))).toEqual([]);
    expect(f.pick('GET', url('/x?token=2'))).toEqual([{ type: 'bad-token' }]);
  });

  it('every bad rule is a ZodError naming the bad field; nothing changes', () => {
    expect(issues({ rules: [{ action: { type: 'explode' } }] })[0]).toMatch(/^rules\.0\.action\.type: .*'latency'.*'revoke-token'/);
    expect(issues({ rules: [{ route: 'GET /x', action: { type: 'reset' } }] })).toEqual(['rules.0: Unrecognized key: "route"']);
    expect(issues({ rules: [{ path: 'api/*', action: { type: 'reset' } }] })[0]).toMatch(/^rules\.0\.path: expected a path glob starting with \//);
    expect(issues({ rules: [{ method: 'FETCH', action: { type: 'reset' } }] })[0]).toMatch(/^rules\.0\.method: expected an HTTP method/);
    expect(issues({ rules: [{ nth: [], action: { type: 'reset' } }] })[0]).toMatch(/^rules\.0\.nth: /);
    expect(issues({ rules: [{ probability: 2, action: { type: 'reset' } }] })[0]).toMatch(/^rules\.0\.probability: /);
    expect(issues({ rules: [{ action: { type: 'status', status: 200 } }] })[0]).toMatch(/^rules\.0\.action\.status: /);
    expect(issues({ rules: [{ action: { type: 'latency', ms: 5, extra: 1 } }] })).toEqual(['rules.0.action: Unrecognized key: "extra"']);
    expect(issues({ seed: 1.5 })[0]).toMatch(/^seed: /);

    const f = grammar.injector();
    f.configure({ rules: [{ action: { type: 'reset' } }] });
    expect(() => f.configure({ rules: [{ action: { type: 'late', ms: -1 } }] } as never)).toThrow(/^Invalid fault config: rules\.0\.action\.ms: /);
    expect(() => f.add({ action: { type: 'reset' } }, { nth: [0], action: { type: 'reset' } })).toThrow(expect.objectContaining({ name: 'ZodError' }));
    expect(f.list()).toHaveLength(1);
  });
});

/** The first `n` draws of rule `id`'s stream under `seed` (how the injector seeds it). */
function seededRandomFor(seed: number, id: number, n: number): number[] {
  const random = seededRandom(streamSeed(seed, id));
  return Array.from({ length: n }, () => random());
}
