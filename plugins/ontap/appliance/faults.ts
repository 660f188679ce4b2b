/**
 * The mock appliance's fault injector. Rules are matched per route (`METHOD /path/glob`, where
 * `*` is one path segment and `**` any rest) and fire on chosen calls (`nth`, 1-based, counted
 * per rule), with a seeded probability, or on every call; `times` caps how often a rule fires.
 * Rules come from `startOntapMock({ faults })`, the CLI's `--faults FILE`, or
 * `POST /_admin/faults` at run time.
 */
import { z } from 'zod';

export const FaultAction = z.discriminatedUnion('type', [
  /** Wait before handling the request. */
  z.object({ type: z.literal('latency'), ms: z.number().int().nonnegative() }),
  /** Answer with this status (429, 503, 500, …) and an ONTAP error body; the request is not handled. */
  z.object({
    type: z.literal('status'),
    status: z.number().int().min(400).max(599),
    retryAfter: z.number().nonnegative().optional(),
    code: z.string().optional(),
    message: z.string().optional(),
  }),
  /** Drop the connection without an answer; the request is not handled. */
  z.object({ type: z.literal('reset') }),
  /** Answer with an HTML body (a proxy's error page); the request is not handled. */
  z.object({ type: z.literal('nonJson'), status: z.number().int().min(200).max(599).default(502) }),
  /** Handle the request (the change happens) but answer only after `ms`: past a client's timeout. */
  z.object({ type: z.literal('delayResponse'), ms: z.number().int().nonnegative() }),
  /** The job this mutation creates fails with `{code,message}` after `afterPolls` job GETs; nothing changes. */
  z.object({
    type: z.literal('jobFailure'),
    afterPolls: z.number().int().nonnegative().default(1),
    code: z.string().default('13001'),
    message: z.string().default('injected failure'),
  }),
  /** The job this mutation creates stays `running` until cancelled; nothing changes. */
  z.object({ type: z.literal('jobStuck') }),
  /** The job vanishes as if it had expired: its GET answers 404 (the work itself still happens). */
  z.object({ type: z.literal('jobExpired') }),
  /** A collection GET stops early (`return_timeout` truncation): `records` items and still a `next` link. */
  z.object({ type: z.literal('shortPage'), records: z.number().int().nonnegative().default(1) }),
]);
export type FaultAction = z.infer<typeof FaultAction>;

export const FaultRule = z.object({
  route: z.string().default('* /**'),
  nth: z.array(z.number().int().positive()).optional(),
  probability: z.number().min(0).max(1).optional(),
  seed: z.number().int().default(1),
  times: z.number().int().positive().optional(),
  action: FaultAction,
});
export type FaultRuleInput = z.input<typeof FaultRule>;
type Rule = z.infer<typeof FaultRule>;

interface ActiveRule {
  id: number;
  rule: Rule;
  pattern: RegExp;
  method: string;
  calls: number;
  fired: number;
  random: () => number;
}

export interface FaultInfo extends Rule {
  id: number;
  calls: number;
  fired: number;
}

export class FaultInjector {
  private rules: ActiveRule[] = [];
  private nextId = 1;

  /** Add rules (validated); returns their ids. */
  add(input: FaultRuleInput | FaultRuleInput[]): number[] {
    const list = (Array.isArray(input) ? input : [input]).map((r) => FaultRule.parse(r));
    return list.map((rule) => {
      const [method, path] = splitRoute(rule.route);
      const id = this.nextId++;
      this.rules.push({ id, rule, method, pattern: globToRegExp(path), calls: 0, fired: 0, random: mulberry32(rule.seed) });
      return id;
    });
  }

  remove(id: number): boolean {
    const before = this.rules.length;
    this.rules = this.rules.filter((r) => r.id !== id);
    return this.rules.length !== before;
  }

  clear(): void {
    this.rules = [];
  }

  list(): FaultInfo[] {
    return this.rules.map((r) => ({ ...r.rule, id: r.id, calls: r.calls, fired: r.fired }));
  }

  /** The actions that fire for this call (each matching rule counts the call). */
  match(method: string, path: string): FaultAction[] {
    const out: FaultAction[] = [];
    for (const r of this.rules) {
      if (r.method !== '*' && r.method !== method) continue;
      if (!r.pattern.test(path)) continue;
      r.calls++;
      if (r.rule.times !== undefined && r.fired >= r.rule.times) continue;
      let fire: boolean;
      if (r.rule.nth) fire = r.rule.nth.includes(r.calls);
      else if (r.rule.probability !== undefined) fire = r.random() < r.rule.probability;
      else fire = true;
      if (!fire) continue;
      r.fired++;
      out.push(r.rule.action);
    }
    return out;
  }
}

function splitRoute(route: string): [string, string] {
  const m = /^\s*(\S+)\s+(\S+)\s*$/.exec(route);
  if (!m) return ['*', route.trim()];
  return [m[1]!.toUpperCase(), m[2]!];
}

function globToRegExp(glob: string): RegExp {
  let re = '';
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i]!;
    if (c === '*' && glob[i + 1] === '*') {
      re += '.*';
      i++;
    } else if (c === '*') re += '[^/]*';
    else re += c.replace(/[.+?^${}()|[\]\\]/g, '\\$&');
  }
  return new RegExp(`^${re}$`);
}

/** A small seeded PRNG so that probabilistic faults replay identically. */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
