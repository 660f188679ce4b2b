import { readFileSync } from 'node:fs';
import { dirname, extname, isAbsolute, resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import type { BackendEntry, BackendFactory } from '../backend/plugin.js';
import type { NbdTlsConfig } from '../export/nbd-tls.js';
import { isValidName } from '../model/refs.js';
import { ConfigError } from './config-error.js';
import { describeIssue, formatPath } from './format-issues.js';
import { secrets } from './secrets.js';

/** A validated broker config: the envelope plus each backend entry as its plugin parsed it. */
export interface BrokerConfig {
  /** Absolute path of the state directory (the SQLite state store, plugins' local state). */
  state: string;
  /**
   * The shared state store, when `state:` is a PostgreSQL URL (`postgres://user@host/db`): the
   * brokers of many hosts share jobs, leases and locks there. Absent: SQLite in `state`.
   */
  database?: string;
  /** The service the CLI sends its commands to (`unix:PATH` or `http://HOST:PORT`); absent: embedded. */
  server?: string;
  /** Folder relative paths in backend entries are resolved against. */
  baseDir: string;
  /** How long a runner's lease on a job lasts without renewal (seconds; default 15). */
  leaseSeconds?: number;
  /** How long a job, an export or an operation waits in line for its locks before it is refused Busy (seconds; default 30). */
  lockWaitSeconds?: number;
  /** How long a concluded job is kept before a service dismisses it (days; default 7; 0: kept until dismissed). */
  jobRetentionDays?: number;
  /**
   * This machine's id among those sharing the state, the same across its boots (RawConfig.hostId):
   * a runner recorded under it in an earlier boot is known gone without waiting for its lease.
   */
  hostId?: string;
  /** NBD exports: TLS every client must start (paths absolute). */
  nbd?: { tls?: NbdTlsConfig };
  backends: (BackendEntry & Record<string, unknown>)[];
}

/** What a user writes (before validation). */
export interface RawConfig {
  /** A folder (default ./.offload), or a PostgreSQL URL for state shared by many hosts. */
  state?: string;
  /** With a PostgreSQL `state`: the folder for local state (default ./.offload). */
  stateDir?: string;
  server?: string;
  leaseSeconds?: number;
  /**
   * How long a job, an export or a short operation waits for locks others hold — behind other
   * brokers' operations, or an administrator for the tenants it preempts — before it is refused
   * Busy (seconds, 0–3600; default 30).
   */
  lockWaitSeconds?: number;
  /**
   * How long a concluded job stays listed before a long-running broker (`offload serve`) dismisses
   * it (days, 0–3650, fractions allowed; default 7; 0 keeps every job until it is dismissed). A live
   * copy that can still be resumed is kept.
   */
  jobRetentionDays?: number;
  /**
   * A name for this machine, unique among the machines sharing the state and the same across its
   * reboots (the node's name; `${NODE_NAME}` takes it from the environment; default: none). With
   * it, a job or export whose process ran here in an earlier boot is known gone at once even if
   * the state folder (whose runner locks tell it otherwise) did not survive the reboot. Two
   * machines — two kernels: a sandboxed pod that runs its own is one — must never share one:
   * each would take the other's running jobs for dead.
   */
  hostId?: string;
  /**
   * `nbd.tls`: every NBD export of this broker requires TLS, as qemu-nbd `--tls-creds`:
   * `{ x509: DIR, verifyPeer? }` (DIR holds ca-cert.pem, server-cert.pem, server-key.pem, and
   * ca-crl.pem if any; verifyPeer, default true, asks clients for a certificate of the CA; allow:
   * only certificates with these names — common names, or DNS:…/URI:…/email:…/IP:… alternative
   * names — as QEMU's tls-authz) or
   * `{ psk: FILE }` (identity:hexkey lines, as psktool writes). Relative paths: from the config's folder.
   */
  nbd?: { tls?: NbdTlsConfig };
  backends: Record<string, unknown>[];
}

const envelopeSchema = z.strictObject({
  state: z.string().min(1).optional(),
  stateDir: z.string().min(1).optional(),
  server: z.string().regex(/^(unix:.+|https?:\/\/.+)$/, 'expected unix:PATH, http://HOST:PORT or https://HOST:PORT').optional(),
  leaseSeconds: z.number().min(1).max(3600).optional(),
  lockWaitSeconds: z.number().min(0).max(3600).optional(),
  jobRetentionDays: z.number().min(0).max(3650).optional(),
  hostId: z.string().refine(isValidName, 'expected a name of 1–128 characters of A-Z a-z 0-9 . _ - not starting with . or -').optional(),
  nbd: z.strictObject({
    tls: z.union([
      z.strictObject({ x509: z.string().min(1), verifyPeer: z.boolean().optional(), allow: z.array(z.string().min(1)).min(1).optional() }),
      z.strictObject({ psk: z.string().min(1) }),
    ], { error: 'expected { x509: FOLDER, verifyPeer?: true|false, allow?: [NAME…] } or { psk: FILE }' }).optional(),
  }).optional(),
  backends: z.array(
    z.looseObject({
      name: z.string().refine(isValidName, 'expected a name of 1–128 characters of A-Z a-z 0-9 . _ - not starting with . or -'),
      kind: z.string().min(1),
    }),
  ),
});

/** Read a YAML or JSON file (YAML is a superset; JSON files parse the same way). */
export function readConfigFile(path: string): { raw: unknown; baseDir: string } {
  const abs = resolve(path);
  let text: string;
  try {
    text = readFileSync(abs, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new ConfigError(
      code === 'ENOENT' ? `config file ${abs} does not exist` : `cannot read config file ${abs}: ${(e as Error).message}`,
      'pass --config FILE or set OFFLOAD_CONFIG',
    );
  }
  try {
    const raw = extname(abs).toLowerCase() === '.json' ? JSON.parse(text) : parseYaml(text);
    return { raw, baseDir: dirname(abs) };
  } catch (e) {
    // Never quote the file: secrets are not known until it parses. JSON: the position only.
    if (extname(abs).toLowerCase() === '.json') {
      const pos = /position (\d+)/.exec((e as Error).message)?.[1];
      const where = pos === undefined ? '' : ` (${lineColumn(text, Number(pos))})`;
      throw new ConfigError(`config file ${abs} is not valid JSON${where}`);
    }
    const lp = (e as { linePos?: { line: number; col: number }[] }).linePos?.[0];
    throw new ConfigError(`config file ${abs} is not valid YAML${lp ? ` (line ${lp.line}, column ${lp.col})` : ''}`);
  }
}

/** Replace `${NAME}` in every string with the environment variable; a missing one names its path. */
export function substituteEnv(value: unknown, env: NodeJS.ProcessEnv, path = ''): unknown {
  if (typeof value === 'string') {
    return value.replace(/\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g, (_, name: string) => {
      const v = env[name];
      if (v === undefined) throw new ConfigError(`${path || '(root)'}: environment variable ${name} is not set`);
      return v;
    });
  }
  if (Array.isArray(value)) return value.map((v, i) => substituteEnv(v, env, `${path}[${i}]`));
  if (value && typeof value === 'object') {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) out[k] = substituteEnv(v, env, path ? `${path}.${k}` : k);
    return out;
  }
  return value;
}

/**
 * Validate a raw config against the envelope and each backend entry against the schema its
 * plugin registered. Secret fields are registered for redaction before anything can fail.
 */
export function validateConfig(
  raw: unknown,
  factories: readonly BackendFactory<object>[],
  opts: { baseDir?: string; env?: NodeJS.ProcessEnv } = {},
): BrokerConfig {
  const baseDir = opts.baseDir ?? process.cwd();
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) {
    throw new ConfigError('config: expected an object with a "backends" list');
  }
  const byKind = new Map(factories.map((f) => [f.kind, f]));
  registerSecrets(raw, byKind);
  const substituted = substituteEnv(raw, opts.env ?? process.env);
  registerSecrets(substituted, byKind);

  const env = envelopeSchema.safeParse(substituted, { reportInput: true });
  if (!env.success) throw issuesError('', env.error.issues);

  const known = [...byKind.keys()].sort();
  const seen = new Set<string>();
  const backends = env.data.backends.map((entry, i) => {
    const path = `backends[${i}]`;
    const factory = byKind.get(entry.kind);
    if (!factory) {
      throw new ConfigError(
        `${path}.kind: unknown kind "${entry.kind}" (known kinds: ${known.length ? known.join(', ') : 'none — no plugins loaded'})`,
      );
    }
    if (seen.has(entry.name)) throw new ConfigError(`${path}.name: duplicate backend name "${entry.name}"`);
    seen.add(entry.name);
    const parsed = factory.configSchema.safeParse(entry, { reportInput: true });
    if (!parsed.success) throw issuesError(path, parsed.error.issues);
    return parsed.data as BackendEntry & Record<string, unknown>;
  });
  const database = env.data.state !== undefined && isDatabaseUrl(env.data.state) ? env.data.state : undefined;
  if (env.data.stateDir !== undefined && database === undefined) {
    throw new ConfigError('stateDir: only with a PostgreSQL `state:` (state: postgres://…); otherwise `state:` is the folder');
  }
  if (database !== undefined) secrets.add(database); // it may carry a password
  const state = (database === undefined ? env.data.state : env.data.stateDir) ?? './.offload';
  return {
    state: isAbsolute(state) ? state : resolve(baseDir, state), baseDir, backends,
    ...(database !== undefined ? { database } : {}),
    ...(env.data.server !== undefined ? { server: env.data.server } : {}),
    ...(env.data.leaseSeconds !== undefined ? { leaseSeconds: env.data.leaseSeconds } : {}),
    ...(env.data.lockWaitSeconds !== undefined ? { lockWaitSeconds: env.data.lockWaitSeconds } : {}),
    ...(env.data.jobRetentionDays !== undefined ? { jobRetentionDays: env.data.jobRetentionDays } : {}),
    ...(env.data.hostId !== undefined ? { hostId: env.data.hostId } : {}),
    ...(env.data.nbd?.tls !== undefined ? { nbd: { tls: absoluteTls(env.data.nbd.tls, baseDir) } } : {}),
  };
}

function absoluteTls(t: NbdTlsConfig, baseDir: string): NbdTlsConfig {
  const abs = (p: string) => (isAbsolute(p) ? p : resolve(baseDir, p));
  return 'psk' in t ? { psk: abs(t.psk) } : { ...t, x509: abs(t.x509) };
}

/** Whether `state:` names a PostgreSQL database rather than a folder. */
export function isDatabaseUrl(state: string): boolean {
  return /^postgres(ql)?:\/\//.test(state);
}

/** A config as createBroker takes it — a file, a raw object, or one validated already — validated. */
export function toBrokerConfig(config: string | RawConfig | BrokerConfig, factories: readonly BackendFactory<object>[], env?: NodeJS.ProcessEnv): BrokerConfig {
  if (typeof config === 'string') return loadConfig(config, factories, env);
  if (config !== null && typeof config === 'object' && typeof (config as BrokerConfig).baseDir === 'string' && typeof (config as BrokerConfig).state === 'string') {
    const c = config as BrokerConfig;
    return validateConfig(validatedToRaw(c), factories, { baseDir: c.baseDir, env });
  }
  return validateConfig(config, factories, { env });
}

/** A validated config as raw input again (validateConfig is not idempotent on its output). */
function validatedToRaw(c: BrokerConfig): RawConfig {
  return {
    state: c.database ?? c.state, ...(c.database !== undefined ? { stateDir: c.state } : {}),
    ...(c.leaseSeconds !== undefined ? { leaseSeconds: c.leaseSeconds } : {}),
    ...(c.lockWaitSeconds !== undefined ? { lockWaitSeconds: c.lockWaitSeconds } : {}),
    ...(c.jobRetentionDays !== undefined ? { jobRetentionDays: c.jobRetentionDays } : {}),
    ...(c.hostId !== undefined ? { hostId: c.hostId } : {}),
    ...(c.server !== undefined ? { server: c.server } : {}),
    ...(c.nbd !== undefined ? { nbd: c.nbd } : {}),
    backends: c.backends,
  };
}

/** Read, substitute and validate a config file. */
export function loadConfig(path: string, factories: readonly BackendFactory<object>[], env?: NodeJS.ProcessEnv): BrokerConfig {
  const { raw, baseDir } = readConfigFile(path);
  return validateConfig(raw, factories, { baseDir, env });
}

function registerSecrets(raw: unknown, byKind: Map<string, BackendFactory<object>>): void {
  const list = (raw as { backends?: unknown }).backends;
  if (!Array.isArray(list)) return;
  for (const entry of list) {
    if (!entry || typeof entry !== 'object') continue;
    const f = byKind.get((entry as { kind?: string }).kind ?? '');
    for (const field of f?.secretFields ?? []) secrets.add((entry as Record<string, unknown>)[field]);
  }
}

function issuesError(prefix: string, issues: readonly z.core.$ZodIssue[]): ConfigError {
  const first = issues[0]!;
  const more = issues.length > 1 ? ` (and ${issues.length - 1} more problem${issues.length > 2 ? 's' : ''})` : '';
  return new ConfigError(secrets.redact(`${formatPath(prefix, first.path)}: ${describeIssue(first)}${more}`));
}

function lineColumn(text: string, pos: number): string {
  const before = text.slice(0, pos).split('\n');
  return `line ${before.length}, column ${before[before.length - 1]!.length + 1}`;
}
