/**
 * Fault rules for the mock appliances: one grammar (README.md, "Fault rules"), built once here
 * with the actions every mock performs, and extended by each mock with its own actions and its
 * own fields of `status` — never with a second grammar. The injector decides which rules fire.
 */
import { z } from 'zod';
import { seededRandom, streamSeed } from './random.js';

const Ms = z.number().int().nonnegative();

const Latency = z.strictObject({ type: z.literal('latency'), ms: Ms });
const Reset = z.strictObject({ type: z.literal('reset'), afterProcessing: z.boolean().default(false) });
const Late = z.strictObject({ type: z.literal('late'), ms: Ms });
const NonJson = z.strictObject({ type: z.literal('non-json'), status: z.number().int().min(200).max(599).default(502) });
const ShortPage = z.strictObject({ type: z.literal('short-page'), items: z.number().int().positive().default(1) });
const statusShape = { type: z.literal('status'), status: z.number().int().min(400).max(599) };

export type LatencyAction = z.output<typeof Latency>;
export type ResetAction = z.output<typeof Reset>;
export type LateAction = z.output<typeof Late>;
export type NonJsonAction = z.output<typeof NonJson>;
export type ShortPageAction = z.output<typeof ShortPage>;
/** `status` as every mock has it; a mock's own fields come on top. */
export interface StatusAction {
  type: 'status';
  status: number;
}
/** The actions every mock performs the same way. */
export type CommonAction = LatencyAction | ResetAction | LateAction | NonJsonAction | ShortPageAction | StatusAction;

const Method = z
  .string()
  .regex(/^(\*|GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS)$/i, { error: 'expected an HTTP method (GET, POST, PUT, PATCH, DELETE, …) or *' });
const PathGlob = z
  .string()
  .regex(/^\//, { error: 'expected a path glob starting with / (* matches within one segment, ** across segments)' });

/** A mock's own action: a strict object whose `type` literal names it. */
export type VendorAction = z.ZodObject<{ type: z.ZodLiteral<string> } & z.ZodRawShape, z.core.$strict>;

/** What a mock adds to the grammar. */
export interface FaultGrammarExtension<S extends z.ZodRawShape, V extends readonly VendorAction[]> {
  /** Its own fields of `status`. */
  statusFields?: S;
  /** Its own actions. */
  actions?: V;
  /** Which calls a rule with this action sees (counts and may fire on); all by default. */
  sees?(action: z.output<V[number]>, url: URL): boolean;
}

/**
 * The schemas of one mock's fault rules: the common actions, `status` with the mock's own fields,
 * and the mock's own actions. Bad rules fail with a ZodError naming the field.
 */
export function defineFaultGrammar<const S extends z.ZodRawShape = {}, const V extends readonly VendorAction[] = []>(
  vendor: FaultGrammarExtension<S, V> = {},
) {
  const Status = z.strictObject({ ...statusShape, ...(vendor.statusFields ?? ({} as S)) });
  const Action = z.discriminatedUnion('type', [Latency, Status, Reset, Late, NonJson, ShortPage, ...(vendor.actions ?? ([] as unknown as V))]);
  const Rule = z.strictObject({
    method: Method.default('*'),
    path: PathGlob.default('/**'),
    nth: z.array(z.number().int().positive()).min(1).optional(),
    probability: z.number().min(0).max(1).optional(),
    times: z.number().int().positive().optional(),
    action: Action,
  });
  const FaultConfig = z.strictObject({ seed: z.number().int().default(1), rules: z.array(Rule).default([]) });
  // The intersection only tells the compiler what every action has; it changes no concrete type.
  type A = z.output<typeof Action> & { type: string };
  const vendorTypes = new Set((vendor.actions ?? []).map((a) => a.shape.type.value));
  const sees = (action: A, url: URL) => !vendor.sees || !vendorTypes.has(action.type) || vendor.sees(action as z.output<V[number]>, url);
  return {
    Action,
    Rule,
    FaultConfig,
    /** A fresh injector for this grammar, with no rules. */
    injector() {
      return new FaultInjector<A, z.input<typeof Rule>, z.input<typeof FaultConfig>>(
        { rule: (r) => strictParse(Rule, r) as FaultRule<A>, config: (c) => strictParse(FaultConfig, c) as FaultConfig<A> },
        sees,
      );
    },
  };
}

/** The injector type of a grammar made by `defineFaultGrammar`. */
export type FaultInjectorOf<G extends { injector(): unknown }> = ReturnType<G['injector']>;

/** One rule, parsed. */
export interface FaultRule<A extends { type: string }> {
  method: string;
  path: string;
  nth?: number[];
  probability?: number;
  times?: number;
  action: A;
}

/** A seed and the rules drawing from it: what `--faults FILE`, `POST /_admin/faults` and `faults:` options hold. */
export interface FaultConfig<A extends { type: string }> {
  seed: number;
  rules: FaultRule<A>[];
}

/** A rule in force, with its id and how many calls it saw and fired on. */
export type FaultRuleState<A extends { type: string }> = FaultRule<A> & { id: number; calls: number; fired: number };

interface Active<A extends { type: string }> {
  state: FaultRuleState<A>;
  pattern: RegExp;
  random: () => number;
}

/** Decides, call by call, which fault rules fire (grammar and semantics: README.md). */
export class FaultInjector<A extends { type: string }, RuleInput, ConfigInput> {
  private active: Active<A>[] = [];
  private currentSeed = 1;
  private nextId = 1;

  constructor(
    private readonly parse: { rule(input: RuleInput): FaultRule<A>; config(input: ConfigInput): FaultConfig<A> },
    private readonly sees: (action: A, url: URL) => boolean = () => true,
  ) {}

  /** Replace every rule and the seed (ids start again at 1); throws a ZodError on a bad config, changing nothing. */
  configure(input: ConfigInput): void {
    const config = this.parse.config(input);
    this.active = [];
    this.currentSeed = config.seed;
    this.nextId = 1;
    this.push(config.rules);
  }

  /** Add a set's rules (the whole set validated first) under the current seed, not the set's; returns their ids. */
  append(input: ConfigInput): number[] {
    return this.push(this.parse.config(input).rules);
  }

  /** Add rules (all validated first) under the current seed; returns their ids. */
  add(...inputs: RuleInput[]): number[] {
    return this.push(inputs.map((r) => this.parse.rule(r)));
  }

  remove(id: number): boolean {
    const before = this.active.length;
    this.active = this.active.filter((r) => r.state.id !== id);
    return this.active.length !== before;
  }

  /** Drop every rule; the seed stays and ids start again at 1. */
  clear(): void {
    this.active = [];
    this.nextId = 1;
  }

  /** The seed the rules' draws come from. */
  get seed(): number {
    return this.currentSeed;
  }

  /** The rules in force, with their ids and counters. */
  list(): FaultRuleState<A>[] {
    return this.active.map((r) => ({ ...r.state }));
  }

  /**
   * The actions that fire on this call, in rule order. Each rule whose method and path match
   * (and that `sees` the call) counts it; it fires when every condition it has holds — under its
   * `times`, the call among its `nth`, then its own seeded draw under `probability`.
   */
  pick(method: string, url: URL): A[] {
    const out: A[] = [];
    const m = method.toUpperCase();
    for (const r of this.active) {
      const s = r.state;
      if (s.method !== '*' && s.method.toUpperCase() !== m) continue;
      if (!r.pattern.test(url.pathname) || !this.sees(s.action, url)) continue;
      s.calls++;
      if (s.times !== undefined && s.fired >= s.times) continue;
      if (s.nth && !s.nth.includes(s.calls)) continue;
      if (s.probability !== undefined && !(r.random() < s.probability)) continue;
      s.fired++;
      out.push(s.action);
    }
    return out;
  }

  private push(rules: FaultRule<A>[]): number[] {
    return rules.map((rule) => {
      const id = this.nextId++;
      this.active.push({ state: { ...rule, id, calls: 0, fired: 0 }, pattern: globToRegExp(rule.path), random: seededRandom(streamSeed(this.currentSeed, id)) });
      return id;
    });
  }
}

/** A ZodError's issues as one line naming each bad field: `rules.0.action.type: …; …`. */
export function describeFaultError(error: z.ZodError): string {
  return error.issues.map((i) => `${i.path.length ? i.path.join('.') : '(top level)'}: ${i.message}`).join('; ');
}

/** Parse, or throw the ZodError with that one line as its message (a CLI or an HTTP answer shows it as is). */
function strictParse<T>(schema: z.ZodType<T>, input: unknown): T {
  const r = schema.safeParse(input);
  if (r.success) return r.data;
  r.error.message = `Invalid fault config: ${describeFaultError(r.error)}`;
  throw r.error;
}

/** `*` matches within one path segment, `**` any run of characters across segments. */
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
