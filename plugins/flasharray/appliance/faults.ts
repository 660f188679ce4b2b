/**
 * The mock array's fault injector: rules chosen per route (method + path pattern) that fire on
 * the n-th matching call, with a seeded probability, or always — at most `times` times. Same
 * seed and same calls, same faults: tests replay exactly.
 */
import { z } from 'zod';

const Status = z.union([z.literal(429), z.literal(500), z.literal(502), z.literal(503), z.literal(504)]);

export const FaultAction = z.discriminatedUnion('type', [
  /** Hold the request this long before handling it. */
  z.strictObject({ type: z.literal('latency'), ms: z.number().int().nonnegative() }),
  /** Answer with this status instead of handling the request (nothing changes). */
  z.strictObject({
    type: z.literal('status'),
    status: Status,
    /** For 429: send the X-RateLimit-* headers (a real gateway does; fragile clients crash without them). */
    rateLimitHeaders: z.boolean().default(true),
    /** For 429 with headers: the minute budget is spent too (a client should wait for the next minute). */
    minuteSpent: z.boolean().default(false),
  }),
  /** Destroy the connection: before handling (nothing changes) or after (the change happened, the answer is lost). */
  z.strictObject({ type: z.literal('reset'), afterProcessing: z.boolean().default(false) }),
  /** Handle the request (the change happens), then hold the answer this long — past a client's timeout. */
  z.strictObject({ type: z.literal('late'), ms: z.number().int().nonnegative() }),
  /** Revoke every session before handling: the request (and any other in flight) gets 401. */
  z.strictObject({ type: z.literal('revoke-token') }),
  /** Answer a list with at most `size` items (and a continuation token when more remain). */
  z.strictObject({ type: z.literal('short-page'), size: z.number().int().positive().default(1) }),
  /** Reject the request's continuation token with 400 (only fires on requests that carry one). */
  z.strictObject({ type: z.literal('bad-continuation-token') }),
  /** Answer with an HTML body instead of JSON, without handling the request. */
  z.strictObject({ type: z.literal('non-json'), status: z.number().int().min(200).max(599).default(200) }),
]);
export type FaultAction = z.infer<typeof FaultAction>;

export const FaultRule = z.strictObject({
  /** HTTP method, or `*`. */
  method: z.string().default('*'),
  /** Path pattern; `*` matches any run of characters, e.g. `/api/*\/volumes`. */
  path: z.string().default('*'),
  /** Fire on these matching calls (1-based). */
  nth: z.array(z.number().int().positive()).optional(),
  /** Fire with this probability (seeded). */
  probability: z.number().min(0).max(1).optional(),
  /** Fire at most this many times. */
  times: z.number().int().positive().optional(),
  action: FaultAction,
});
export type FaultRuleInput = z.input<typeof FaultRule>;
export type FaultRule = z.infer<typeof FaultRule>;

export const FaultConfig = z.strictObject({
  seed: z.number().int().default(1),
  rules: z.array(FaultRule).default([]),
});
export type FaultConfigInput = z.input<typeof FaultConfig>;

interface ActiveRule { rule: FaultRule; pattern: RegExp; calls: number; fired: number }

export interface FaultRuleState extends FaultRule { calls: number; fired: number }

export class FaultInjector {
  private rules: ActiveRule[] = [];
  private random: () => number = mulberry32(1);

  constructor(config: FaultConfigInput = {}) {
    this.configure(config);
  }

  /** Replace all rules (and reseed); throws a ZodError on a bad config. */
  configure(config: FaultConfigInput): void {
    const parsed = FaultConfig.parse(config);
    this.random = mulberry32(parsed.seed);
    this.rules = parsed.rules.map((rule) => ({ rule, pattern: globToRegExp(rule.path), calls: 0, fired: 0 }));
  }

  /** Add rules, keeping the current ones and the RNG state. */
  add(...rules: FaultRuleInput[]): void {
    for (const r of rules) {
      const rule = FaultRule.parse(r);
      this.rules.push({ rule, pattern: globToRegExp(rule.path), calls: 0, fired: 0 });
    }
  }

  clear(): void {
    this.rules = [];
  }

  /** The actions that fire for this request (each matching rule counts the call). */
  pick(method: string, path: string, hasContinuationToken: boolean): FaultAction[] {
    const out: FaultAction[] = [];
    for (const r of this.rules) {
      if (r.rule.method !== '*' && r.rule.method.toUpperCase() !== method.toUpperCase()) continue;
      if (!r.pattern.test(path)) continue;
      if (r.rule.action.type === 'bad-continuation-token' && !hasContinuationToken) continue;
      r.calls++;
      if (r.rule.times !== undefined && r.fired >= r.rule.times) continue;
      let fire = true;
      if (r.rule.nth) fire = r.rule.nth.includes(r.calls);
      if (fire && r.rule.probability !== undefined) fire = this.random() < r.rule.probability;
      if (!fire) continue;
      r.fired++;
      out.push(r.rule.action);
    }
    return out;
  }

  state(): FaultRuleState[] {
    return this.rules.map((r) => ({ ...r.rule, calls: r.calls, fired: r.fired }));
  }
}

function globToRegExp(glob: string): RegExp {
  const body = glob.split('*').map((s) => s.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('.*');
  return new RegExp(`^${body}$`);
}

/** A small seeded PRNG (mulberry32): deterministic fault schedules. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
