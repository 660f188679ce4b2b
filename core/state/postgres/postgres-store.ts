import { AsyncLocalStorage } from 'node:async_hooks';
import pg from 'pg';
import { AlreadyExists, FailedPrecondition, isOffloadError } from '../../model/errors.js';
import { RELEASED, opLocksFromRows, type ExportRecord, type JobRecord, type LockHolders, type OpLockRecord, type OpLockRow, type StoredRequest } from '../records.js';
import type { JobFilter, OpRequests, Runner, StateOps, StateStore, TransactionLock } from '../state-store.js';
import { describeUrl, toStoreError, type Target } from './errors.js';
import {
  ADVISORY_KEYS, JOB_COLUMNS, exportFromRow, fromRow, migrate, placeholders, toRow,
  type ExportRow, type JobRow,
} from './schema.js';

export interface PostgresStoreOptions {
  /** Connections in the pool (default 10). A transaction holds one until it ends. */
  poolSize?: number;
}

/** Runs one statement: on the pool (its own transaction) or on a transaction's client. */
type Query = <R extends pg.QueryResultRow>(sql: string, params?: unknown[]) => Promise<pg.QueryResult<R>>;

/** Prepared statements' names, one per statement text. */
const statementNames = new Map<string, string>();
function statementName(sql: string): string {
  let name = statementNames.get(sql);
  if (name === undefined) statementNames.set(sql, (name = `offload_${statementNames.size + 1}`));
  return name;
}

/** BIGINT (int8) columns — epoch milliseconds, sizes, fences — as JS numbers rather than pg's default strings. */
const INT8 = 20;
const getTypeParser = ((oid: number, format?: 'text' | 'binary') => {
  if (oid === INT8 && format !== 'binary') return (v: string) => Number(v);
  return pg.types.getTypeParser(oid, format);
}) as typeof pg.types.getTypeParser;

/**
 * Open the PostgreSQL StateStore at `url` (postgres://USER[:PASSWORD]@HOST[:PORT]/DB, or the
 * unix-socket form postgres://USER@/DB?host=/run/postgresql): connect, and create or migrate the
 * schema. FailedPrecondition if the database was written by a newer build or refuses the login;
 * BackendUnavailable if the server cannot be reached. No message carries the URL's password.
 */
export async function openPostgresStore(url: string, opts: PostgresStoreOptions = {}): Promise<PostgresStateStore> {
  const target = describeUrl(url);
  const pool = new pg.Pool({
    connectionString: url,
    max: opts.poolSize ?? 10,
    connectionTimeoutMillis: 10_000,
    idleTimeoutMillis: 30_000,
    application_name: 'offload-broker',
    types: { getTypeParser },
  });
  // An idle client whose server went away: the next query reports it; the pool must not crash the process.
  pool.on('error', () => undefined);
  try {
    const client = await pool.connect();
    let broken: Error | undefined;
    try {
      await migrate(client, target.where);
    } catch (e) {
      if (!isOffloadError(e)) broken = e instanceof Error ? e : new Error(String(e));
      throw e;
    } finally {
      client.release(broken);
    }
  } catch (e) {
    await pool.end().catch(() => undefined);
    throw toStoreError(e, target);
  }
  return new PostgresStateStore(pool, target);
}

/**
 * The shared StateStore: one PostgreSQL database for the brokers of many hosts. Every method is
 * one statement (atomic on its own); a transaction is one pooled connection between BEGIN and
 * COMMIT that first takes a transaction-scoped advisory lock, so transactions taking the same
 * lock run one after the other whichever broker runs them.
 */
export class PostgresStateStore implements StateStore {
  readonly kind = 'postgres';
  private readonly ops: StateOps;
  private readonly inTransaction = new AsyncLocalStorage<true>();
  private closing: Promise<void> | undefined;

  /** Use openPostgresStore, which creates or migrates the schema first. */
  constructor(private readonly pool: pg.Pool, private readonly target: Target) {
    this.ops = postgresOps(this.query(pool));
  }

  /** Statements on `on`, their failures as typed errors. */
  private query(on: pg.Pool | pg.PoolClient): Query {
    return async <R extends pg.QueryResultRow>(sql: string, params?: unknown[]) => {
      if (this.closing) throw new FailedPrecondition(`the PostgreSQL state store (${this.target.where}) is closed`, { ref: this.target.ref });
      try {
        // A statement with parameters is prepared once per connection (saves parsing and planning it on every call).
        return await (params === undefined ? on.query<R>(sql) : on.query<R>({ name: statementName(sql), text: sql, values: params }));
      } catch (e) {
        throw toStoreError(e, this.target);
      }
    };
  }

  async transaction<T>(lock: TransactionLock, fn: (tx: StateOps) => Promise<T>): Promise<T> {
    if (this.inTransaction.getStore()) throw new FailedPrecondition('state transactions do not nest: use the tx you were given');
    if (this.closing) throw new FailedPrecondition(`the PostgreSQL state store (${this.target.where}) is closed`, { ref: this.target.ref });
    let client: pg.PoolClient;
    try {
      client = await this.pool.connect();
    } catch (e) {
      throw toStoreError(e, this.target);
    }
    const q = this.query(client);
    let live = true;
    // Calls through a tx that outlived its transaction fail instead of running outside it (or on a client someone else now has).
    const tx = guard(postgresOps(q), () => {
      if (!live) throw new FailedPrecondition('a state transaction was used after it ended');
    });
    let broken: Error | undefined;
    try {
      // One round trip: the simple protocol runs both statements (the key is a constant of ours, not input).
      await q(`BEGIN; SELECT pg_advisory_xact_lock(${BigInt(ADVISORY_KEYS[lock])})`);
      const out = await this.inTransaction.run(true, () => fn(tx));
      await q('COMMIT');
      return out;
    } catch (e) {
      try {
        await client.query('ROLLBACK');
      } catch (rollbackFailed) {
        // The connection is unusable: the pool must not hand it out again.
        broken = rollbackFailed instanceof Error ? rollbackFailed : new Error(String(rollbackFailed));
      }
      throw e;
    } finally {
      live = false;
      client.release(broken);
    }
  }

  getJob(id: string) { return this.ops.getJob(id); }
  listJobs(filter?: JobFilter) { return this.ops.listJobs(filter); }
  insertJob(job: JobRecord) { return this.ops.insertJob(job); }
  updateJob(job: JobRecord) { return this.ops.updateJob(job); }
  deleteJob(id: string) { return this.ops.deleteJob(id); }
  claimJob(id: string, from: { token: string; fence: number; leaseExpires: number }, to: Runner, leaseExpires: number) { return this.ops.claimJob(id, from, to, leaseExpires); }
  renewLease(id: string, token: string, fence: number, leaseExpires: number) { return this.ops.renewLease(id, token, fence, leaseExpires); }
  releaseJob(id: string, token: string, fence: number, checkpoint: unknown) { return this.ops.releaseJob(id, token, fence, checkpoint); }
  replaceCheckpoint(id: string, expected: unknown, next: unknown) { return this.ops.replaceCheckpoint(id, expected, next); }
  setRequest(id: string, request: StoredRequest) { return this.ops.setRequest(id, request); }
  takeRequest(id: string) { return this.ops.takeRequest(id); }
  insertOpLocks(op: OpLockRecord) { return this.ops.insertOpLocks(op); }
  deleteOpLocks(id: string | readonly string[]) { return this.ops.deleteOpLocks(id); }
  listOpLocks() { return this.ops.listOpLocks(); }
  renewOps(token: string, leaseExpires: number) { return this.ops.renewOps(token, leaseExpires); }
  lockHolders(keys?: string[], prefixes?: string[]) { return this.ops.lockHolders(keys, prefixes); }
  claimOpLocks(op: OpLockRecord, also?: { keys?: string[]; prefixes?: string[] }) { return this.ops.claimOpLocks(op, also); }
  requestOpStop(id: string) { return this.ops.requestOpStop(id); }
  requestOpCall(id: string, opId: string, call: string) { return this.ops.requestOpCall(id, opId, call); }
  takeOpRequests(opIds: readonly string[]) { return this.ops.takeOpRequests(opIds); }
  answerOpCall(id: string, answer: string) { return this.ops.answerOpCall(id, answer); }
  takeOpCallAnswer(id: string) { return this.ops.takeOpCallAnswer(id); }
  withdrawOpCall(id: string) { return this.ops.withdrawOpCall(id); }
  sweepOpCalls(before: string) { return this.ops.sweepOpCalls(before); }
  insertExport(e: ExportRecord) { return this.ops.insertExport(e); }
  deleteExport(id: string) { return this.ops.deleteExport(id); }
  listExports() { return this.ops.listExports(); }
  listMaintenance() { return this.ops.listMaintenance(); }
  placeMaintenance(key: string, principal: string, reason: string) { return this.ops.placeMaintenance(key, principal, reason); }
  removeMaintenance(key: string) { return this.ops.removeMaintenance(key); }
  setOwner(ref: string, owner: string) { return this.ops.setOwner(ref, owner); }
  getOwner(ref: string) { return this.ops.getOwner(ref); }
  getOwners(refs: readonly string[]) { return this.ops.getOwners(refs); }
  deleteOwner(ref: string) { return this.ops.deleteOwner(ref); }

  /** End the pool (waits for checked-out connections to come back). Idempotent. */
  close(): Promise<void> {
    this.closing ??= this.pool.end().catch(() => undefined);
    return this.closing;
  }
}

/** Text columns sort bytewise, as SQLite's do, whatever the database's collation. */
const C = 'COLLATE "C"';

/** The store's operations as statements through `q`. */
function postgresOps(q: Query): StateOps {
  return {
    getJob: async (id) => {
      const row = (await q<JobRow>('SELECT * FROM jobs WHERE id = $1', [id])).rows[0];
      return row && fromRow(row);
    },
    listJobs: async (filter) => {
      const where = [...(filter?.active ? ["status <> 'concluded'"] : []), ...(filter?.type !== undefined ? ['type = $1'] : [])];
      return (await q<JobRow>(`SELECT * FROM jobs${where.length > 0 ? ` WHERE ${where.join(' AND ')}` : ''} ORDER BY created_at ${C}, id ${C}`,
        filter?.type !== undefined ? [filter.type] : [])).rows.map(fromRow);
    },
    insertJob: async (job) => {
      const row = toRow(job);
      try {
        await q(`INSERT INTO jobs (${JOB_COLUMNS.join(', ')}) VALUES (${placeholders(JOB_COLUMNS.length)})`, JOB_COLUMNS.map((c) => row[c]));
      } catch (e) {
        if (isOffloadError(e) && e.data?.sqlstate === '23505') throw new AlreadyExists(`job ${job.id} already exists`, { ref: job.id });
        throw e;
      }
    },
    updateJob: async (job) => {
      const r = toRow(job);
      // Fenced, and keeps a pending request: only the live fields, only while the runner and its fence still hold the job.
      const res = await q(`UPDATE jobs SET status = $2, progress_current = $3, progress_total = $4, speed = $5, error_code = $6,
        error_message = $7, cancelled = $8, checkpoint = $9, runner_pid = $10, runner_host = $11, lease_expires = $12, updated_at = $13
        WHERE id = $1 AND runner_token = $14 AND fence = $15`,
      [r.id, r.status, r.progress_current, r.progress_total, r.speed, r.error_code, r.error_message, r.cancelled, r.checkpoint,
        r.runner_pid, r.runner_host, r.lease_expires, r.updated_at, r.runner_token, r.fence]);
      return res.rowCount === 1;
    },
    deleteJob: async (id) => {
      await q('DELETE FROM jobs WHERE id = $1', [id]);
    },
    claimJob: async (id, from, to, leaseExpires) => {
      // One statement: of racing takers, the first to update the row wins; the others re-check the
      // WHERE against its new version (token, fence), match nothing, and get undefined.
      const res = await q<{ fence: number }>(`UPDATE jobs SET runner_pid = $1, runner_token = $2, runner_host = $3, lease_expires = $4,
        seen_at = $5, fence = fence + 1 WHERE id = $6 AND runner_token = $7 AND fence = $8 AND lease_expires = $9 AND status <> 'concluded'
        RETURNING fence`,
      [to.pid, to.token, to.host, leaseExpires, Date.now(), id, from.token, from.fence, from.leaseExpires]);
      return res.rows[0]?.fence;
    },
    renewLease: async (id, token, fence, leaseExpires) => {
      const res = await q('UPDATE jobs SET lease_expires = $1, seen_at = $2 WHERE id = $3 AND runner_token = $4 AND fence = $5',
        [leaseExpires, Date.now(), id, token, fence]);
      return res.rowCount === 1;
    },
    releaseJob: async (id, token, fence, checkpoint) => {
      const res = await q(`UPDATE jobs SET runner_pid = 0, runner_token = $1, lease_expires = 0, checkpoint = $2, updated_at = $3
        WHERE id = $4 AND runner_token = $5 AND fence = $6`,
      [RELEASED, checkpoint === undefined ? null : JSON.stringify(checkpoint), new Date().toISOString(), id, token, fence]);
      return res.rowCount === 1;
    },
    replaceCheckpoint: async (id, expected, next) => {
      const json = (v: unknown) => (v === undefined ? null : JSON.stringify(v));
      const res = await q('UPDATE jobs SET checkpoint = $1 WHERE id = $2 AND checkpoint IS NOT DISTINCT FROM $3', [json(next), id, json(expected)]);
      return res.rowCount === 1;
    },
    setRequest: async (id, request) => {
      // A cancel replaces anything; another verb never replaces a pending cancel (checked in the same statement).
      const sql = request.verb === 'cancel'
        ? 'UPDATE jobs SET request = $1 WHERE id = $2'
        : `UPDATE jobs SET request = $1 WHERE id = $2 AND (request IS NULL OR (request::jsonb ->> 'verb') IS DISTINCT FROM 'cancel')`;
      await q(sql, [JSON.stringify(request), id]);
    },
    takeRequest: async (id) => {
      // Read and clear in one statement: the row lock makes a second taker wait, then read the cleared value.
      const res = await q<{ request: string | null }>(`UPDATE jobs SET request = NULL
        FROM (SELECT id, request FROM jobs WHERE id = $1 AND request IS NOT NULL FOR UPDATE) AS old
        WHERE jobs.id = old.id AND old.request IS NOT NULL RETURNING old.request`, [id]);
      const request = res.rows[0]?.request;
      return request ? (JSON.parse(request) as StoredRequest) : undefined;
    },
    // One statement, one round trip (offload_lock_holders, schema.ts): each part as a JSON array of
    // its rows (BIGINT columns come back as JSON numbers, as INT8 is read elsewhere).
    lockHolders: async (keys, prefixes) => holdersFrom((await q<{ h: HoldersJson }>('SELECT offload_lock_holders($1::text[], $2::text[]) AS h', [keys ?? null, prefixes ?? []])).rows[0]!.h),
    claimOpLocks: async (op, also) => {
      const claim = op.locks.map((l) => ({
        id: op.id, key: l.key, mode: l.mode, principal: op.principal, role: op.role, description: op.description,
        runner_pid: op.runnerPid, runner_token: op.runnerToken, runner_host: op.runnerHost, lease_expires: op.leaseExpires,
      }));
      const keys = [...new Set([...op.locks.map((l) => l.key), ...(also?.keys ?? [])])];
      const h = (await q<{ h: { holders: HoldersJson; owners: Record<string, string> | null } }>('SELECT offload_claim_op_locks_owners($1::json, $2::text[], $3::text[]) AS h',
        [JSON.stringify(claim), keys, also?.prefixes ?? []])).rows[0]!.h;
      return { ...holdersFrom(h.holders), owners: h.owners ?? {} };
    },
    insertOpLocks: async (op) => {
      if (op.locks.length === 0) return;
      const params: unknown[] = [];
      const rows = op.locks.map((l) => {
        params.push(op.id, l.key, l.mode, op.principal, op.role, op.description, op.runnerPid, op.runnerToken, op.runnerHost, op.leaseExpires);
        return `(${placeholders(10, params.length - 9)})`;
      });
      await q(`INSERT INTO op_locks (id, key, mode, principal, role, description, runner_pid, runner_token, runner_host, lease_expires)
        VALUES ${rows.join(', ')}`, params);
    },
    deleteOpLocks: async (ids) => {
      await q(`WITH stop AS (DELETE FROM op_stop_requests WHERE id = ANY ($1::text[])),
        calls AS (DELETE FROM op_calls WHERE op_id = ANY ($1::text[]) AND NOT taken)
        DELETE FROM op_locks WHERE id = ANY ($1::text[])`, [typeof ids === 'string' ? [ids] : ids]);
    },
    listOpLocks: async () => opLocksFromRows((await q<OpLockRow>(
      `SELECT id, key, mode, principal, role, description, runner_pid, runner_token, runner_host, lease_expires, seq FROM op_locks ORDER BY id ${C}, seq`)).rows),
    renewOps: async (token, leaseExpires) => {
      await q('WITH e AS (UPDATE exports SET lease_expires = $2 WHERE runner_token = $1) UPDATE op_locks SET lease_expires = $2 WHERE runner_token = $1', [token, leaseExpires]);
    },
    requestOpStop: async (id) => {
      await q('INSERT INTO op_stop_requests (id, requested_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING', [id, new Date().toISOString()]);
    },
    requestOpCall: async (id, opId, call) => ((await q(
      'INSERT INTO op_calls (id, op_id, call, requested_at) SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM op_locks WHERE id = $2)',
      [id, opId, call, new Date().toISOString()])).rowCount ?? 0) > 0,
    // One statement for all of a process's exports; one that matches nothing writes nothing.
    takeOpRequests: async (opIds) => (await q<{ r: OpRequests }>(`WITH stops AS (DELETE FROM op_stop_requests WHERE id = ANY ($1::text[]) RETURNING id),
      calls AS (UPDATE op_calls SET taken = true WHERE op_id = ANY ($1::text[]) AND NOT taken RETURNING id, op_id, call, requested_at)
      SELECT json_build_object('stops', (SELECT coalesce(json_agg(id), '[]') FROM stops),
        'calls', (SELECT coalesce(json_agg(json_build_object('id', id, 'opId', op_id, 'call', call) ORDER BY requested_at), '[]') FROM calls)) AS r`,
    [opIds])).rows[0]!.r,
    answerOpCall: async (id, answer) => {
      await q('UPDATE op_calls SET answer = $2 WHERE id = $1', [id, answer]);
    },
    withdrawOpCall: async (id) => ((await q('DELETE FROM op_calls WHERE id = $1 AND NOT taken', [id])).rowCount ?? 0) > 0,
    sweepOpCalls: async (before) => (await q(`DELETE FROM op_calls WHERE requested_at < $1 ${C}`, [before])).rowCount ?? 0,
    takeOpCallAnswer: async (id) => {
      const taken = (await q<{ answer: string }>('DELETE FROM op_calls WHERE id = $1 AND answer IS NOT NULL RETURNING answer', [id])).rows[0];
      if (taken) return taken.answer;
      return (await q('SELECT 1 FROM op_calls WHERE id = $1', [id])).rows.length > 0 ? undefined : null;
    },
    insertExport: async (e) => {
      await q(`INSERT INTO exports (id, name, ref, uri, read_only, owner, role, runner_pid, runner_token, started_at, runner_host, lease_expires)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
        ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, ref = EXCLUDED.ref, uri = EXCLUDED.uri, read_only = EXCLUDED.read_only,
          owner = EXCLUDED.owner, role = EXCLUDED.role, runner_pid = EXCLUDED.runner_pid, runner_token = EXCLUDED.runner_token,
          started_at = EXCLUDED.started_at, runner_host = EXCLUDED.runner_host, lease_expires = EXCLUDED.lease_expires`,
      [e.id, e.name, e.ref, e.uri, e.readOnly, e.owner, e.role, e.runnerPid, e.runnerToken, e.startedAt, e.runnerHost, e.leaseExpires]);
    },
    deleteExport: async (id) => {
      await q('DELETE FROM exports WHERE id = $1', [id]);
    },
    listExports: async () => (await q<ExportRow>(`SELECT * FROM exports ORDER BY name ${C}, id ${C}`)).rows.map(exportFromRow),
    listMaintenance: async () => (await q<{ key: string; principal: string; reason: string }>(
      `SELECT key, principal, reason FROM maintenance ORDER BY key ${C}`)).rows.map((r) => ({ key: r.key, principal: r.principal, reason: r.reason })),
    placeMaintenance: async (key, principal, reason) => {
      await q(`INSERT INTO maintenance (key, principal, reason, created_at) VALUES ($1, $2, $3, $4)
        ON CONFLICT (key) DO UPDATE SET principal = EXCLUDED.principal, reason = EXCLUDED.reason, created_at = EXCLUDED.created_at`,
      [key, principal, reason, new Date().toISOString()]);
    },
    removeMaintenance: async (key) => {
      await q('DELETE FROM maintenance WHERE key = $1', [key]);
    },
    setOwner: async (ref, owner) => {
      await q('INSERT INTO owners (ref, owner) VALUES ($1, $2) ON CONFLICT (ref) DO UPDATE SET owner = EXCLUDED.owner', [ref, owner]);
    },
    getOwner: async (ref) => (await q<{ owner: string }>('SELECT owner FROM owners WHERE ref = $1', [ref])).rows[0]?.owner,
    getOwners: async (refs) => {
      const out: Record<string, string> = {};
      if (refs.length === 0) return out;
      for (const r of (await q<{ ref: string; owner: string }>('SELECT ref, owner FROM owners WHERE ref = ANY ($1::text[])', [refs])).rows) out[r.ref] = r.owner;
      return out;
    },
    deleteOwner: async (ref) => {
      await q('DELETE FROM owners WHERE ref = $1', [ref]);
    },
  };
}

type HoldersJson = { jobs: JobRow[]; ops: OpLockRow[]; maintenance: { key: string; principal: string; reason: string }[] };

function holdersFrom(h: HoldersJson): LockHolders {
  return { jobs: h.jobs.map(fromRow), ops: opLocksFromRows(h.ops), maintenance: h.maintenance };
}

/** `ops` with `check` run before every call. */
function guard(ops: StateOps, check: () => void): StateOps {
  const out: Record<string, unknown> = {};
  for (const [k, f] of Object.entries(ops) as [string, (...a: unknown[]) => Promise<unknown>][]) {
    out[k] = async (...a: unknown[]) => {
      check();
      return f(...a);
    };
  }
  return out as unknown as StateOps;
}
