/**
 * The PostgreSQL store's tables (the SQLite store's, in PostgreSQL types), their migrations, and
 * how a job record maps to a row and back.
 */
import type pg from 'pg';
import type { ErrorCode } from '../../model/errors.js';
import { FailedPrecondition } from '../../model/errors.js';
import type { JobStatus } from '../../jobs/job.js';
import type { LockRequest } from '../../locks/lock-manager.js';
import type { ExportRecord, JobRecord, StoredRequest } from '../records.js';

/**
 * Advisory lock keys (pg_advisory_xact_lock, per database): one for creating or migrating the
 * schema, one per TransactionLock. Fixed for ever: every build must take the same ones.
 */
export const ADVISORY_KEYS = {
  schema: '7308893760230401',
  locks: '7308893760230402',
} as const;

/**
 * JSON fields are TEXT holding JSON.stringify's output, as in SQLite: a JSON `null` checkpoint
 * stays distinct from no checkpoint (SQL NULL). Epoch milliseconds, sizes and fences are BIGINT
 * (read back as numbers: see INT8 in postgres-store.ts). op_locks.seq keeps an operation's locks
 * in the order they were inserted (SQLite's rowid does that there).
 */
const SCHEMA_V1 = `
CREATE TABLE jobs (
  id TEXT PRIMARY KEY,
  type TEXT NOT NULL,
  status TEXT NOT NULL,
  executor TEXT NOT NULL,
  backend TEXT,
  ref TEXT NOT NULL,
  owner TEXT NOT NULL,
  owner_role TEXT NOT NULL DEFAULT 'admin',
  progress_current BIGINT NOT NULL,
  progress_total BIGINT NOT NULL,
  speed BIGINT NOT NULL,
  error_code TEXT,
  error_message TEXT,
  cancelled BOOLEAN NOT NULL DEFAULT FALSE,
  params TEXT NOT NULL,
  plan TEXT,
  checkpoint TEXT,
  runner_pid INTEGER NOT NULL,
  runner_token TEXT NOT NULL,
  request TEXT,
  locks TEXT NOT NULL DEFAULT '[]',
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  runner_host TEXT NOT NULL DEFAULT '',
  lease_expires BIGINT NOT NULL DEFAULT 0,
  seen_at BIGINT NOT NULL DEFAULT 0,
  fence BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE op_locks (
  seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  id TEXT NOT NULL,
  key TEXT NOT NULL,
  mode TEXT NOT NULL,
  principal TEXT NOT NULL,
  role TEXT NOT NULL,
  description TEXT NOT NULL,
  runner_pid INTEGER NOT NULL,
  runner_token TEXT NOT NULL
);
CREATE INDEX op_locks_id ON op_locks (id);
CREATE TABLE maintenance (
  key TEXT PRIMARY KEY,
  principal TEXT NOT NULL,
  reason TEXT NOT NULL,
  created_at TEXT NOT NULL
);
CREATE TABLE op_stop_requests (
  id TEXT PRIMARY KEY,
  requested_at TEXT NOT NULL
);
CREATE TABLE exports (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  ref TEXT NOT NULL,
  uri TEXT NOT NULL,
  read_only BOOLEAN NOT NULL,
  owner TEXT NOT NULL,
  role TEXT NOT NULL,
  runner_pid INTEGER NOT NULL,
  runner_token TEXT NOT NULL,
  started_at TEXT NOT NULL
);
CREATE TABLE owners (
  ref TEXT PRIMARY KEY,
  owner TEXT NOT NULL
);
`;

const C = 'COLLATE "C"';
/** The rows of a claim (a JSON array of op_locks rows) inserted in order: the claim functions' first step. */
const INSERT_CLAIM = `  INSERT INTO op_locks (id, key, mode, principal, role, description, runner_pid, runner_token, runner_host, lease_expires)
    SELECT r.id, r.key, r.mode, r.principal, r.role, r.description, r.runner_pid, r.runner_token, r.runner_host, r.lease_expires
    FROM json_populate_recordset(NULL::op_locks, claim) WITH ORDINALITY AS r ORDER BY r.ordinality;`;

/**
 * Schema 6's functions plan their statements once per connection. PL/pgSQL keeps planning a
 * statement for each call's values while that plan looks cheaper than the generic one, which
 * these small, indexed reads never need: with `prefixes`, always (0.30 → 0.15 ms a lock check).
 * PostgreSQL 12 or later.
 */
const GENERIC = ' SET plan_cache_mode = force_generic_plan';

/**
 * Keys starting with the prefix \`p\`, found through op_locks_key_c (bytewise order: a key that
 * starts with p sorts from p up to p followed by DEL, as lock keys are ASCII: names are
 * [A-Za-z0-9._-]) rather than by a scan of a table whose rows every claim inserts and deletes.
 * chr(127) exists in every server encoding (a higher code point is refused by SQL_ASCII, LATIN1…).
 */
const PREFIX_RANGE = (key: string) => `${key} ${C} >= p ${C} AND ${key} ${C} < (p || chr(127)) ${C} AND starts_with(${key}, p)`;

/**
 * Schema 6's lock rules (core/locks/whole-volume.ts) are unknown to older builds: the functions
 * they call now refuse, so that a broker of an older build still running takes no lock on this
 * database (its operations and new jobs fail, naming the cause) until it is restarted with this
 * build. Its running jobs go on: they take no new lock.
 */
const REFUSE_OLDER = ['offload_lock_holders(keys text[])', 'offload_claim_op_locks(claim json, keys text[])', 'offload_claim_op_locks_owners(claim json, keys text[])']
  .map((f) => `CREATE OR REPLACE FUNCTION ${f} RETURNS json LANGUAGE plpgsql STABLE AS $$
BEGIN
  RAISE EXCEPTION 'offload-broker: this database is used by a newer build (schema 6), whose lock rules this one does not know: restart this broker with that build';
END
$$;
`).join('');

/**
 * What a lock check reads, as one function (StateOps.lockHolders): schema 3's, schema 5's with each
 * operation's place in the order of claims (`seq`), and schema 6's that also takes `prefixes` (the
 * holders of keys starting with one: a volume's snapshots), an overload of its own.
 */
function lockHoldersFunction(seq: boolean, prefixes = false, jobLocks = false): string {
  // Each part's match: by key (an index), then, with prefixes, by prefix (no prefixes: nothing scanned).
  const byPrefix = (key: string) => (prefixes ? ` OR EXISTS (SELECT 1 FROM unnest(prefixes) p WHERE starts_with(${key}, p))` : '');
  return `CREATE OR REPLACE FUNCTION offload_lock_holders(keys text[]${prefixes ? ', prefixes text[]' : ''}) RETURNS json LANGUAGE plpgsql STABLE${prefixes ? GENERIC : ''} AS $$
BEGIN
  RETURN json_build_object(
    'jobs', (SELECT coalesce(json_agg(j ORDER BY j.created_at ${C}, j.id ${C}), '[]'::json) FROM jobs j WHERE j.status <> 'concluded'
       AND (keys IS NULL OR ${jobLocks
         ? `j.id IN (SELECT k.job_id FROM job_locks k WHERE k.key ${C} = ANY (keys) UNION ALL SELECT k.job_id FROM unnest(prefixes) p, job_locks k WHERE ${PREFIX_RANGE('k.key')})`
         : `EXISTS (SELECT 1 FROM json_array_elements(j.locks::json) l WHERE l->>'key' = ANY (keys)${byPrefix("l->>'key'")})`})),
    'ops', (SELECT coalesce(json_agg(json_build_object('id', o.id, 'key', o.key, 'mode', o.mode, 'principal', o.principal, 'role', o.role,
       'description', o.description, 'runner_pid', o.runner_pid, 'runner_token', o.runner_token, 'runner_host', o.runner_host,
       'lease_expires', o.lease_expires${seq ? ", 'seq', o.seq" : ''}) ORDER BY o.id ${C}, o.seq), '[]'::json) FROM op_locks o
       WHERE keys IS NULL OR o.id IN (SELECT k.id FROM op_locks k WHERE k.key = ANY (keys)${prefixes ? ` UNION ALL SELECT k.id FROM unnest(prefixes) p, op_locks k WHERE ${PREFIX_RANGE('k.key')}` : ''})),
    'maintenance', (SELECT coalesce(json_agg(json_build_object('key', m.key, 'principal', m.principal, 'reason', m.reason) ORDER BY m.key ${C}), '[]'::json)
       FROM maintenance m WHERE keys IS NULL OR m.key = ANY (keys)${byPrefix('m.key')}));
END
$$;
`;
}

/** The claim with its keys' owner records (schema 4's), and schema 6's overload that reads holders by prefix too. */
function claimFunction(prefixes: boolean): string {
  return `CREATE OR REPLACE FUNCTION offload_claim_op_locks_owners(claim json, keys text[]${prefixes ? ', prefixes text[]' : ''}) RETURNS json LANGUAGE plpgsql VOLATILE${prefixes ? GENERIC : ''} AS $$
BEGIN
  PERFORM pg_advisory_xact_lock(${ADVISORY_KEYS.locks});
${INSERT_CLAIM}
  RETURN json_build_object('holders', offload_lock_holders(keys${prefixes ? ', prefixes' : ''}),
    'owners', (SELECT json_object_agg(o.ref, o.owner) FROM owners o WHERE o.ref = ANY (keys)));
END
$$;
`;
}

const SCHEMA_V3 = `
CREATE INDEX jobs_active ON jobs (created_at) WHERE status <> 'concluded';
CREATE INDEX op_locks_key ON op_locks (key);
${lockHoldersFunction(false)}CREATE OR REPLACE FUNCTION offload_claim_op_locks(claim json, keys text[]) RETURNS json LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  PERFORM pg_advisory_xact_lock(${ADVISORY_KEYS.locks});
${INSERT_CLAIM}
  RETURN offload_lock_holders(keys);
END
$$;
`;

const SCHEMA_V4 = claimFunction(false);

const SCHEMA_V5 = lockHoldersFunction(true);

/**
 * Schema 6's job_locks: the keys of the active jobs' locks, one row each, kept by a trigger (a
 * job's locks are set when it is recorded and held until it concludes; a deleted job's rows go
 * with it), so that a lock check finds the jobs holding its keys through an index rather than in
 * every active job's locks (a claim with 500 active jobs: 1.7 ms, now 0.41 as with none).
 */
const JOB_LOCKS = `CREATE TABLE job_locks (job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE, key TEXT NOT NULL);
CREATE INDEX job_locks_key ON job_locks (key ${C});
CREATE INDEX job_locks_job ON job_locks (job_id);
CREATE FUNCTION offload_job_locks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    IF NEW.status <> 'concluded' THEN
      INSERT INTO job_locks (job_id, key) SELECT NEW.id, l->>'key' FROM json_array_elements(NEW.locks::json) l;
    END IF;
  ELSIF NEW.status = 'concluded' AND OLD.status <> 'concluded' THEN
    DELETE FROM job_locks WHERE job_id = NEW.id;
  END IF;
  RETURN NULL;
END
$$;
CREATE TRIGGER jobs_job_locks AFTER INSERT OR UPDATE OF status ON jobs FOR EACH ROW EXECUTE FUNCTION offload_job_locks();
INSERT INTO job_locks (job_id, key) SELECT j.id, l->>'key' FROM jobs j, json_array_elements(j.locks::json) l WHERE j.status <> 'concluded';
`;

const SCHEMA_V6 = `CREATE INDEX op_locks_key_c ON op_locks (key ${C});

${lockHoldersFunction(true, true)}${claimFunction(true)}${REFUSE_OLDER}`;

const SCHEMA_V7 = `${JOB_LOCKS}${lockHoldersFunction(true, true, true)}`;

/** Schema versions (the one row of schema_version) and the SQL that reaches each from the one before. */
const MIGRATIONS: { version: number; sql: string }[] = [
  // 1: jobs with leases and fencing tokens (the SQLite store's version 2), op locks, exports, maintenance, owners.
  { version: 1, sql: SCHEMA_V1 },
  // 2: operations and exports name their runner's host and hold a lease (the SQLite store's version 3).
  {
    version: 2,
    sql: `ALTER TABLE op_locks ADD COLUMN runner_host TEXT NOT NULL DEFAULT '', ADD COLUMN lease_expires BIGINT NOT NULL DEFAULT 0;
      ALTER TABLE exports ADD COLUMN runner_host TEXT NOT NULL DEFAULT '', ADD COLUMN lease_expires BIGINT NOT NULL DEFAULT 0;`,
  },
  // 3: what a lock check reads as one function (all holders, or those of some keys: indexes for
  // both; PL/pgSQL, whose plans are kept per connection, where a SQL function is planned on every call), and claiming an operation's locks in one round trip (StateOps.claimOpLocks): a PL/pgSQL
  // function takes the 'locks' advisory lock, inserts, then reads; being VOLATILE, each of its
  // statements sees what was committed before it ran (READ COMMITTED).
  { version: 3, sql: SCHEMA_V3 },
  // 4: a claim that reads the owner records of its keys too (StateOps.claimOpLocks): an
  // operation's lock and its volume's owner in one round trip; the result is { holders, owners }.
  // A function of its own: brokers of the build before, still running, call schema 3's.
  { version: 4, sql: SCHEMA_V4 },
  // 5: operations' locks come with their place in the order of claims (seq: OpLockRecord.seq), so
  // that a claim waiting in line can tell which claims came after it. The same function, its
  // result one field richer: brokers of the builds before read it as they did.
  { version: 5, sql: SCHEMA_V5 },
  // 6: a lock check that also reads the holders of keys by prefix (a volume's snapshots, for a
  // claim whose exclusive lock on the volume covers them: OpClaims), as overloads of both
  // functions; the functions brokers of the builds before call refuse (REFUSE_OLDER).
  { version: 6, sql: SCHEMA_V6 },
  // 7: the active jobs' lock keys in a table of their own, which lock checks find jobs through (JOB_LOCKS).
  { version: 7, sql: SCHEMA_V7 },
  // 8: calls one broker asks of the process serving an export (a snapshot of its volume: StateOps.requestOpCall).
  {
    version: 8,
    sql: `CREATE TABLE op_calls (id TEXT PRIMARY KEY, op_id TEXT NOT NULL, call TEXT NOT NULL, taken BOOLEAN NOT NULL DEFAULT false,
      answer TEXT, requested_at TEXT NOT NULL);
      CREATE INDEX op_calls_op ON op_calls (op_id);`,
  },
];
export const SCHEMA_VERSION = MIGRATIONS[MIGRATIONS.length - 1]!.version;

/**
 * Create the schema (a new database) or migrate it, in one transaction under the schema's
 * advisory lock, so brokers starting at once do not race. A database whose version is newer than
 * this build knows is refused (FailedPrecondition), and nothing is written. `where` names the
 * database in messages (never with a password).
 */
export async function migrate(client: pg.PoolClient, where: string): Promise<void> {
  await client.query('BEGIN');
  try {
    await client.query('SELECT pg_advisory_xact_lock($1)', [ADVISORY_KEYS.schema]);
    await client.query('CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)');
    const rows = (await client.query<{ version: number }>('SELECT version FROM schema_version')).rows;
    const version = rows.length ? Math.max(...rows.map((r) => r.version)) : 0;
    if (version > SCHEMA_VERSION) {
      throw new FailedPrecondition(`the PostgreSQL state database ${where} has schema version ${version}, newer than this build knows (${SCHEMA_VERSION})`, {
        ref: where, hint: 'upgrade offload-broker, or use another database',
      });
    }
    for (const m of MIGRATIONS) if (m.version > version) await client.query(m.sql);
    if (version < SCHEMA_VERSION) {
      await client.query('DELETE FROM schema_version');
      await client.query('INSERT INTO schema_version (version) VALUES ($1)', [SCHEMA_VERSION]);
    }
    await client.query('COMMIT');
  } catch (e) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw e;
  }
}

export interface JobRow {
  id: string; type: string; status: string; executor: string; backend: string | null; ref: string; owner: string; owner_role: string;
  progress_current: number; progress_total: number; speed: number; error_code: string | null; error_message: string | null;
  cancelled: boolean; params: string; plan: string | null; checkpoint: string | null; runner_pid: number; runner_token: string;
  request: string | null; locks: string; created_at: string; updated_at: string;
  runner_host: string; lease_expires: number; seen_at: number; fence: number;
}

export const JOB_COLUMNS: readonly (keyof JobRow)[] = [
  'id', 'type', 'status', 'executor', 'backend', 'ref', 'owner', 'owner_role', 'progress_current', 'progress_total', 'speed',
  'error_code', 'error_message', 'cancelled', 'params', 'plan', 'checkpoint', 'runner_pid', 'runner_token', 'request', 'locks',
  'created_at', 'updated_at', 'runner_host', 'lease_expires', 'seen_at', 'fence',
];

/** `$1, $2, … $n`. */
export function placeholders(n: number, from = 1): string {
  return Array.from({ length: n }, (_, i) => `$${i + from}`).join(', ');
}

const json = (v: unknown): string | null => (v === undefined ? null : JSON.stringify(v));

export function toRow(j: JobRecord): JobRow {
  return {
    id: j.id, type: j.type, status: j.status, executor: j.executor, backend: j.backend ?? null, ref: j.ref, owner: j.owner, owner_role: j.ownerRole,
    progress_current: Math.round(j.progress.current), progress_total: Math.round(j.progress.total), speed: Math.round(j.speed),
    error_code: j.error?.code ?? null, error_message: j.error?.message ?? null, cancelled: j.cancelled,
    params: JSON.stringify(j.params), plan: json(j.plan), checkpoint: json(j.checkpoint), runner_pid: j.runnerPid,
    runner_token: j.runnerToken, request: j.request ? JSON.stringify(j.request) : null, locks: JSON.stringify(j.locks),
    created_at: j.createdAt, updated_at: j.updatedAt, runner_host: j.runnerHost, lease_expires: j.leaseExpires, seen_at: j.seenAt, fence: j.fence,
  };
}

export function fromRow(r: JobRow): JobRecord {
  const rec: JobRecord = {
    id: r.id, type: r.type, status: r.status as JobStatus, executor: r.executor, ref: r.ref, owner: r.owner,
    progress: { current: r.progress_current, total: r.progress_total }, speed: r.speed, cancelled: r.cancelled,
    params: JSON.parse(r.params) as Record<string, unknown>, createdAt: r.created_at, updatedAt: r.updated_at,
    runnerPid: r.runner_pid, runnerToken: r.runner_token, runnerHost: r.runner_host, leaseExpires: r.lease_expires, seenAt: r.seen_at, fence: r.fence,
    locks: JSON.parse(r.locks) as LockRequest[],
    ownerRole: r.owner_role === 'tenant' ? 'tenant' : 'admin',
  };
  if (r.backend !== null) rec.backend = r.backend;
  if (r.error_code !== null) rec.error = { code: r.error_code as ErrorCode, message: r.error_message ?? '' };
  if (r.plan !== null) rec.plan = JSON.parse(r.plan) as unknown;
  if (r.checkpoint !== null) rec.checkpoint = JSON.parse(r.checkpoint) as unknown;
  if (r.request !== null) rec.request = JSON.parse(r.request) as StoredRequest;
  return rec;
}


export interface ExportRow {
  id: string; name: string; ref: string; uri: string; read_only: boolean; owner: string; role: string; runner_pid: number; runner_token: string; started_at: string;
  runner_host: string; lease_expires: number;
}

export function exportFromRow(r: ExportRow): ExportRecord {
  return {
    id: r.id, name: r.name, ref: r.ref, uri: r.uri, readOnly: r.read_only, owner: r.owner, role: r.role === 'tenant' ? 'tenant' : 'admin',
    runnerPid: r.runner_pid, runnerToken: r.runner_token, runnerHost: r.runner_host, leaseExpires: r.lease_expires, startedAt: r.started_at,
  };
}
