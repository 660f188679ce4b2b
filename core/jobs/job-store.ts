import Database from 'better-sqlite3';
import { mkdirSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { FailedPrecondition, type ErrorCode } from '../model/errors.js';
import type { JobStatus } from './job.js';
import type { LockRequest } from '../locks/lock-manager.js';
import type { OpRequests } from '../state/state-store.js';

export type { JobRecord, OpLockRecord, ExportRecord, StoredRequest } from '../state/records.js';
export { RELEASED } from '../state/records.js';
import { RELEASED, opLocksFromRows, type ClaimedLocks, type ExportRecord, type JobRecord, type LockHolders, type OpLockRecord, type OpLockRow, type StoredRequest } from '../state/records.js';

/**
 * Since version 4 (new stores have them too): a lock check of some keys reads only their holders
 * (op locks by key and by id), and the active jobs without the concluded ones, which pile up:
 * each claim read every row before (7.7 ms a claim with 5,000 operations' rows).
 */
const INDEXES_V4 = `CREATE INDEX IF NOT EXISTS op_locks_key ON op_locks (key);
CREATE INDEX IF NOT EXISTS op_locks_id ON op_locks (id);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs (created_at, id) WHERE status <> 'concluded';
`;

/**
 * The lock rules this build follows (core/locks/whole-volume.ts): 1. The rows of operations and
 * jobs carry it, and a row without (an older build's, which does not know the rules) is refused:
 * brokers of two builds cannot take locks on one state at once.
 */
const LOCK_RULES = 1;
const LOCK_RULES_V5 = ['op_locks', 'jobs'].map((t) => `CREATE TRIGGER IF NOT EXISTS ${t}_lock_rules BEFORE INSERT ON ${t} WHEN NEW.lock_rules < ${LOCK_RULES}
BEGIN SELECT RAISE(ABORT, 'offload-broker: this state is used by a newer build, whose lock rules this one does not know: restart this broker with that build'); END;`).join('\n');

/**
 * Version 6: the keys of the active jobs' locks, one row each, kept by triggers (a job's
 * locks are set when it is recorded and held until it concludes), so that a lock check finds the
 * jobs holding its keys through an index rather than in every active job's locks: with 500 active
 * jobs a claim took 5.9 ms parsing them all here, 0.87 reading their JSON in SQL, 0.05 this way.
 */
const JOB_LOCKS_V6 = `CREATE TABLE IF NOT EXISTS job_locks (job_id TEXT NOT NULL, key TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS job_locks_key ON job_locks (key);
CREATE INDEX IF NOT EXISTS job_locks_job ON job_locks (job_id);
CREATE TRIGGER IF NOT EXISTS jobs_locks_recorded AFTER INSERT ON jobs WHEN NEW.status <> 'concluded'
BEGIN INSERT INTO job_locks (job_id, key) SELECT NEW.id, json_extract(l.value, '$.key') FROM json_each(NEW.locks) l; END;
CREATE TRIGGER IF NOT EXISTS jobs_locks_concluded AFTER UPDATE OF status ON jobs WHEN NEW.status = 'concluded'
BEGIN DELETE FROM job_locks WHERE job_id = NEW.id; END;
CREATE TRIGGER IF NOT EXISTS jobs_locks_deleted AFTER DELETE ON jobs BEGIN DELETE FROM job_locks WHERE job_id = OLD.id; END;`;

/** Version 6's job_locks for the active jobs of a store migrated to it. */
const JOB_LOCKS_FILL = `DELETE FROM job_locks; INSERT INTO job_locks (job_id, key) SELECT j.id, json_extract(l.value, '$.key') FROM jobs j, json_each(j.locks) l WHERE j.status <> 'concluded';`

const SCHEMA = `
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  type TEXT NOT NULL,
  status TEXT NOT NULL,
  executor TEXT NOT NULL,
  backend TEXT,
  ref TEXT NOT NULL,
  owner TEXT NOT NULL,
  owner_role TEXT NOT NULL DEFAULT 'admin',
  progress_current INTEGER NOT NULL,
  progress_total INTEGER NOT NULL,
  speed INTEGER NOT NULL,
  error_code TEXT,
  error_message TEXT,
  cancelled INTEGER NOT NULL DEFAULT 0,
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
  lease_expires INTEGER NOT NULL DEFAULT 0,
  seen_at INTEGER NOT NULL DEFAULT 0,
  fence INTEGER NOT NULL DEFAULT 0,
  lock_rules INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS op_locks (
  id TEXT NOT NULL,
  key TEXT NOT NULL,
  mode TEXT NOT NULL,
  principal TEXT NOT NULL,
  role TEXT NOT NULL,
  description TEXT NOT NULL,
  runner_pid INTEGER NOT NULL,
  runner_token TEXT NOT NULL,
  runner_host TEXT NOT NULL DEFAULT '',
  lease_expires INTEGER NOT NULL DEFAULT 0,
  lock_rules INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS maintenance (
  key TEXT PRIMARY KEY,
  principal TEXT NOT NULL,
  reason TEXT NOT NULL,
  created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS op_stop_requests (
  id TEXT PRIMARY KEY,
  requested_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS op_calls (
  id TEXT PRIMARY KEY,
  op_id TEXT NOT NULL,
  call TEXT NOT NULL,
  taken INTEGER NOT NULL DEFAULT 0,
  answer TEXT,
  requested_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS op_calls_op ON op_calls (op_id);
CREATE TABLE IF NOT EXISTS exports (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  ref TEXT NOT NULL,
  uri TEXT NOT NULL,
  read_only INTEGER NOT NULL,
  owner TEXT NOT NULL,
  role TEXT NOT NULL,
  runner_pid INTEGER NOT NULL,
  runner_token TEXT NOT NULL,
  started_at TEXT NOT NULL,
  runner_host TEXT NOT NULL DEFAULT '',
  lease_expires INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS owners (
  ref TEXT PRIMARY KEY,
  owner TEXT NOT NULL
);
${INDEXES_V4}`;

/**
 * Schema versions (PRAGMA user_version) and how to reach each from the one before: a state
 * directory written by an older build is migrated when a broker opens it.
 */
const MIGRATIONS: { version: number; sql: string; columns?: [table: string, column: string, type: string][] }[] = [
  // 1: the tables of SCHEMA before leases.
  { version: 1, sql: '' },
  // 2: job leases and fencing tokens.
  {
    version: 2,
    sql: `ALTER TABLE jobs ADD COLUMN runner_host TEXT NOT NULL DEFAULT '';
      ALTER TABLE jobs ADD COLUMN lease_expires INTEGER NOT NULL DEFAULT 0;
      ALTER TABLE jobs ADD COLUMN seen_at INTEGER NOT NULL DEFAULT 0;
      ALTER TABLE jobs ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;`,
  },
  // 3: operations and exports name their runner's host and hold a lease (brokers on many hosts).
  // Columns are added only where missing: a store older than these tables got them new above.
  { version: 3, sql: '', columns: [['op_locks', 'runner_host', "TEXT NOT NULL DEFAULT ''"], ['op_locks', 'lease_expires', 'INTEGER NOT NULL DEFAULT 0'],
    ['exports', 'runner_host', "TEXT NOT NULL DEFAULT ''"], ['exports', 'lease_expires', 'INTEGER NOT NULL DEFAULT 0']] },
  // 4: a lock check of some keys reads only their holders (INDEXES_V4).
  { version: 4, sql: INDEXES_V4 },
  // 5: rows carry this build's lock rules, and an older build's are refused (LOCK_RULES).
  { version: 5, sql: LOCK_RULES_V5, columns: [['op_locks', 'lock_rules', 'INTEGER NOT NULL DEFAULT 0'], ['jobs', 'lock_rules', 'INTEGER NOT NULL DEFAULT 0']] },
  // 6: the active jobs' lock keys in a table of their own, which lock checks find jobs through (JOB_LOCKS_V6).
  { version: 6, sql: `${JOB_LOCKS_V6}\n${JOB_LOCKS_FILL}` },
];
const SCHEMA_VERSION = MIGRATIONS[MIGRATIONS.length - 1]!.version;
/** The lease that active jobs of a store written before leases get when it is migrated. */
const MIGRATION_GRACE_MS = 15_000;

interface Row {
  id: string; type: string; status: string; executor: string; backend: string | null; ref: string; owner: string; owner_role: string;
  progress_current: number; progress_total: number; speed: number; error_code: string | null; error_message: string | null;
  cancelled: number; params: string; plan: string | null; checkpoint: string | null; runner_pid: number; runner_token: string;
  request: string | null; locks: string; created_at: string; updated_at: string;
  runner_host: string; lease_expires: number; seen_at: number; fence: number;
}

/**
 * The broker's durable state in SQLite (WAL, so `offload jobs list` in one process reads while a
 * job in another writes): jobs, and which principal owns which volume.
 */
export class JobStore {
  private readonly db: Database.Database;

  /** `busyTimeoutMs`: how long a statement waits for another process's lock before Busy (default 5 s). */
  constructor(private readonly file: string, busyTimeoutMs = 5000) {
    if (file !== ':memory:') mkdirSync(dirname(file), { recursive: true });
    this.db = new Database(file);
    try {
      this.db.pragma('journal_mode = WAL');
      this.db.pragma(`busy_timeout = ${Math.trunc(busyTimeoutMs)}`);
      this.db.pragma('synchronous = NORMAL');
      this.migrate();
    } catch (e) {
      this.db.close();
      throw e;
    }
  }

  /** Statements are prepared once per SQL text (preparing costs more than running most of them). */
  private readonly statements = new Map<string, Database.Statement>();

  private stmt(sql: string): Database.Statement {
    let st = this.statements.get(sql);
    if (!st) {
      st = this.db.prepare(sql);
      this.statements.set(sql, st);
    }
    return st;
  }

  /** An explicit transaction (SqliteStateStore.transaction): BEGIN IMMEDIATE takes SQLite's writer lock now. */
  begin(): void {
    this.db.exec('BEGIN IMMEDIATE');
  }

  commit(): void {
    this.db.exec('COMMIT');
  }

  rollback(): void {
    if (this.db.inTransaction) this.db.exec('ROLLBACK');
  }

  /** Durable writes made since the last takeDurable(). */
  private durableWrites = 0;

  /**
   * Run `fn`, a write someone will be told of, and note that its commit must outlive a power loss,
   * not only a crash of this process: in WAL mode with synchronous=NORMAL (the store's setting) the
   * last commits are synced only at the next checkpoint. The store then syncs the log (syncLog)
   * before the call resolves — on libuv's thread pool: synchronous=FULL would sync inside the
   * commit, on the event loop, where an fdatasync that waits behind a pool's dirty pages (ext4's
   * ordered mode commits them together) would hold every export of the process.
   */
  durably<T>(fn: () => T): T {
    const out = fn();
    this.durableWrites++;
    return out;
  }

  /** Whether durable writes were made since the last call (the caller then syncs the log). */
  takeDurable(): boolean {
    const any = this.durableWrites > 0;
    this.durableWrites = 0;
    return any;
  }

  /**
   * Make every commit so far durable: fdatasync of the write-ahead log, as synchronous=FULL does at
   * each commit. A log that is gone was checkpointed into the database file, which a checkpoint
   * syncs.
   */
  async syncLog(): Promise<void> {
    if (this.file === ':memory:') return;
    let log: FileHandle;
    try {
      log = await open(`${this.file}-wal`, 'r');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw e;
    }
    try {
      await log.datasync();
    } finally {
      await log.close();
    }
  }

  /** Create the tables (a new store) or bring an older store's up to SCHEMA_VERSION. */
  private migrate(): void {
    this.db.transaction(() => {
      const version = this.db.pragma('user_version', { simple: true }) as number;
      const fresh = !this.stmt("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").get();
      if (fresh) {
        this.db.exec(SCHEMA);
        this.db.exec(LOCK_RULES_V5);
        this.db.exec(JOB_LOCKS_V6);
      } else {
        if (version > SCHEMA_VERSION) {
          throw new FailedPrecondition(`the job store ${this.db.name} has schema version ${version}, newer than this build knows (${SCHEMA_VERSION})`, {
            ref: this.db.name, hint: 'upgrade offload-broker, or use another state directory',
          });
        }
        // Tables added since version 1 without changing older ones.
        this.db.exec(SCHEMA.replace(/CREATE TABLE IF NOT EXISTS jobs \([^;]*\);/, ''));
        for (const m of MIGRATIONS) {
          if (m.version <= Math.max(version, 1)) continue;
          // Columns first: the migration's statements may use them.
          for (const [table, column, type] of m.columns ?? []) {
            const has = (this.db.pragma(`table_info(${table})`) as { name: string }[]).some((c) => c.name === column);
            if (!has) this.db.exec(`ALTER TABLE ${table} ADD COLUMN ${column} ${type}`);
          }
          if (m.sql) this.db.exec(m.sql);
        }
        // Jobs of a build before leases get one lease's grace: their runner may still be alive.
        if (version < 2) this.stmt("UPDATE jobs SET lease_expires = ? WHERE status <> 'concluded'").run(Date.now() + MIGRATION_GRACE_MS);
      }
      this.db.pragma(`user_version = ${SCHEMA_VERSION}`);
    }).immediate();
  }

  /**
   * Record a new job. `check` runs in the same IMMEDIATE transaction, so two processes that
   * check for conflicting jobs and then insert their own cannot both succeed.
   */
  insert(job: JobRecord, check: () => void = () => undefined): void {
    this.db.transaction(() => {
      check();
      this.insertStmt(job);
    }).immediate();
  }

  /**
   * Take over an orphaned job: succeeds for exactly one runner (compare-and-set on the runner, its
   * fencing token and its lease as the taker read them, on a job not concluded), which gets the
   * next fencing token; undefined if another was first, or the view was stale.
   */
  claim(id: string, old: { token: string; fence: number; leaseExpires: number }, runner: { pid: number; token: string; host: string }, leaseExpires: number): number | undefined {
    const now = Date.now();
    // The lease as the taker read it: a runner that renewed since (it lives after all) or a job
    // that concluded meanwhile makes the claim miss.
    const changed = this.stmt(`UPDATE jobs SET runner_pid = ?, runner_token = ?, runner_host = ?, lease_expires = ?, seen_at = ?, fence = fence + 1
      WHERE id = ? AND runner_token = ? AND fence = ? AND lease_expires = ? AND status <> 'concluded'`)
      .run(runner.pid, runner.token, runner.host, leaseExpires, now, id, old.token, old.fence, old.leaseExpires).changes === 1;
    return changed ? old.fence + 1 : undefined;
  }

  /** Renew a lease: false when the job is no longer this runner's (taken over, deleted). */
  renew(id: string, token: string, fence: number, leaseExpires: number): boolean {
    return this.stmt('UPDATE jobs SET lease_expires = ?, seen_at = ? WHERE id = ? AND runner_token = ? AND fence = ?')
      .run(leaseExpires, Date.now(), id, token, fence).changes === 1;
  }

  private insertStmt(job: JobRecord): void {
    this.stmt(`INSERT INTO jobs
      (id, type, status, executor, backend, ref, owner, owner_role, progress_current, progress_total, speed, error_code, error_message,
       cancelled, params, plan, checkpoint, runner_pid, runner_token, request, locks, created_at, updated_at, runner_host, lease_expires, seen_at, fence, lock_rules)
      VALUES (@id, @type, @status, @executor, @backend, @ref, @owner, @owner_role, @progress_current, @progress_total, @speed, @error_code,
       @error_message, @cancelled, @params, @plan, @checkpoint, @runner_pid, @runner_token, @request, @locks, @created_at, @updated_at,
       @runner_host, @lease_expires, @seen_at, @fence, ${LOCK_RULES})`)
      .run(toRow(job));
  }

  /**
   * Update the live fields of a job this runner holds, keeping a pending cross-process request.
   * Fenced: false (nothing written) when the record is no longer this runner's — another runner
   * took it over (a newer fencing token) or it was deleted.
   */
  update(job: JobRecord): boolean {
    const r = toRow(job);
    return this.stmt(`UPDATE jobs SET status=@status, progress_current=@progress_current, progress_total=@progress_total,
      speed=@speed, error_code=@error_code, error_message=@error_message, cancelled=@cancelled, checkpoint=@checkpoint,
      runner_pid=@runner_pid, runner_token=@runner_token, runner_host=@runner_host, lease_expires=@lease_expires,
      updated_at=@updated_at WHERE id=@id AND runner_token=@runner_token AND fence=@fence`).run(r).changes === 1;
  }

  /**
   * A runner gives a job up without concluding it (its broker closes): the lease ends now, so
   * another runner may take the job over at once. Fenced like update().
   */
  release(id: string, token: string, fence: number, checkpoint: unknown): boolean {
    return this.stmt(`UPDATE jobs SET runner_pid = 0, runner_token = '${RELEASED}', lease_expires = 0, checkpoint = ?, updated_at = ?
      WHERE id = ? AND runner_token = ? AND fence = ?`)
      .run(checkpoint === undefined ? null : JSON.stringify(checkpoint), new Date().toISOString(), id, token, fence).changes === 1;
  }

  replaceCheckpoint(id: string, expected: unknown, next: unknown): boolean {
    const json = (v: unknown) => (v === undefined ? null : JSON.stringify(v));
    return this.stmt('UPDATE jobs SET checkpoint = ? WHERE id = ? AND checkpoint IS ?').run(json(next), id, json(expected)).changes === 1;
  }

  get(id: string): JobRecord | undefined {
    const row = this.stmt('SELECT * FROM jobs WHERE id = ?').get(id) as Row | undefined;
    return row && fromRow(row);
  }

  list(filter?: { active?: boolean; type?: string }): JobRecord[] {
    const where = [...(filter?.active ? ["status <> 'concluded'"] : []), ...(filter?.type !== undefined ? ['type = ?'] : [])];
    const sql = `SELECT * FROM jobs${where.length > 0 ? ` WHERE ${where.join(' AND ')}` : ''} ORDER BY created_at, id`;
    return (this.stmt(sql).all(...(filter?.type !== undefined ? [filter.type] : [])) as Row[]).map(fromRow);
  }

  delete(id: string): void {
    this.stmt('DELETE FROM jobs WHERE id = ?').run(id);
  }

  /**
   * Ask the process running a job to apply a verb (read by that process's poll). A pending
   * cancel is never overwritten by another verb: cancel wins.
   */
  setRequest(id: string, request: StoredRequest): void {
    const sql = request.verb === 'cancel'
      ? 'UPDATE jobs SET request = ? WHERE id = ?'
      : `UPDATE jobs SET request = ? WHERE id = ? AND (request IS NULL OR json_extract(request, '$.verb') <> 'cancel')`;
    this.stmt(sql).run(JSON.stringify(request), id);
  }

  /** Take (read and clear) a pending request. */
  takeRequest(id: string): StoredRequest | undefined {
    const tx = this.db.transaction(() => {
      const row = this.stmt('SELECT request FROM jobs WHERE id = ?').get(id) as { request: string | null } | undefined;
      if (!row?.request) return undefined;
      this.stmt('UPDATE jobs SET request = NULL WHERE id = ?').run(id);
      return JSON.parse(row.request) as StoredRequest;
    });
    // IMMEDIATE: of two processes taking at once, one gets the request and the other waits, then
    // finds none (a deferred read would be upgraded to a write only to fail as busy).
    return tx.immediate();
  }

  /**
   * Record the locks of a short operation (create, resize, revert, delete …) so other processes
   * see them; `check` runs in the same IMMEDIATE transaction.
   */
  insertOpLocks(op: OpLockRecord, check: () => void): void {
    this.db.transaction(() => {
      check();
      this.insertOpRows(op);
    }).immediate();
  }

  /** What a lock check reads (StateOps.lockHolders): every holder, or those with a lock on one of `keys` or on a key starting with one of `prefixes`. */
  lockHolders(keys?: string[], prefixes: string[] = []): LockHolders {
    return this.db.transaction(() => {
      if (!keys) return { jobs: this.list({ active: true }), ops: this.listOpLocks(), maintenance: this.listMaintenance() };
      return this.holdersOf(keys, prefixes);
    })();
  }

  /**
   * insertOpLocks, then the holders of its keys (the claim included, and those `also` names) and their owner records, in one IMMEDIATE transaction.
   * Every short operation on another volume makes one: its statements are few, and no savepoints (0.06 → 0.03 ms a claim).
   */
  claimOpLocks(op: OpLockRecord, also: { keys?: string[]; prefixes?: string[] } = {}): ClaimedLocks {
    this.claimTx ??= this.db.transaction((o: OpLockRecord, more: { keys?: string[]; prefixes?: string[] }): ClaimedLocks => {
      this.insertOpRows(o);
      const keys = o.locks.map((l) => l.key);
      const rows = this.stmt('SELECT ref, owner FROM owners WHERE ref IN (SELECT value FROM json_each(?))').all(JSON.stringify(keys)) as { ref: string; owner: string }[];
      const owners: Record<string, string> = {};
      for (const r of rows) owners[r.ref] = r.owner;
      return { ...this.holdersOf([...keys, ...(more.keys ?? [])], more.prefixes ?? []), owners };
    });
    return this.claimTx.immediate(op, also);
  }

  private claimTx: Database.Transaction<(op: OpLockRecord, also: { keys?: string[]; prefixes?: string[] }) => ClaimedLocks> | undefined;

  private insertOpRows(op: OpLockRecord): void {
    const stmt = this.stmt(`INSERT INTO op_locks (id, key, mode, principal, role, description, runner_pid, runner_token, runner_host, lease_expires, lock_rules)
      VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ${LOCK_RULES})`);
    for (const l of op.locks) stmt.run(op.id, l.key, l.mode, op.principal, op.role, op.description, op.runnerPid, op.runnerToken, op.runnerHost, op.leaseExpires);
  }

  /** The holders of a lock on one of `keys` or on a key starting with one of `prefixes`, inside a transaction of the caller's. */
  private holdersOf(keys: string[], prefixes: string[]): LockHolders {
    // Keys and prefixes as JSON arrays (one prepared statement whatever their number); no prefixes, no scan for them.
    const params = { keys: JSON.stringify([...new Set(keys)]), prefixes: JSON.stringify(prefixes) };
    // The active jobs that hold one, through job_locks (JOB_LOCKS_V6): only those rows are read.
    // A prefix's keys run from it up to it followed by DEL (lock keys are ASCII), found through
    // the key's index (CROSS JOIN: SQLite then loops over the prefixes, not over the rows).
    const jobs = (this.stmt(`SELECT * FROM jobs j WHERE j.status <> 'concluded' AND j.id IN (
        SELECT job_id FROM job_locks WHERE key IN (SELECT value FROM json_each(@keys))
        UNION SELECT k.job_id FROM json_each(@prefixes) p CROSS JOIN job_locks k WHERE k.key >= p.value AND k.key < p.value || char(127))
      ORDER BY j.created_at, j.id`).all(params) as Row[]).map(fromRow);
    const ops = opLocksFromRows(this.stmt(`SELECT rowid AS seq, * FROM op_locks WHERE id IN (
        SELECT id FROM op_locks WHERE key IN (SELECT value FROM json_each(@keys))
        UNION ALL SELECT o.id FROM json_each(@prefixes) p CROSS JOIN op_locks o WHERE o.key >= p.value AND o.key < p.value || char(127))
      ORDER BY id, rowid`).all(params) as OpLockRow[]);
    const maintenance = this.stmt(`SELECT m.key, m.principal, m.reason FROM maintenance m WHERE m.key IN (SELECT value FROM json_each(@keys))
      OR EXISTS (SELECT 1 FROM json_each(@prefixes) p WHERE substr(m.key, 1, length(p.value)) = p.value) ORDER BY m.key`).all(params) as { key: string; principal: string; reason: string }[];
    return { jobs, ops, maintenance };
  }

  deleteOpLocks(ids: string | readonly string[]): void {
    this.db.transaction(() => {
      for (const id of typeof ids === 'string' ? [ids] : ids) {
        this.stmt('DELETE FROM op_locks WHERE id = ?').run(id);
        this.stmt('DELETE FROM op_stop_requests WHERE id = ?').run(id);
        this.stmt('DELETE FROM op_calls WHERE op_id = ? AND taken = 0').run(id);
      }
    }).immediate();
  }

  /** Extend the lease of a runner's operations and exports. */
  renewOps(token: string, leaseExpires: number): void {
    this.db.transaction(() => {
      this.stmt('UPDATE op_locks SET lease_expires = ? WHERE runner_token = ?').run(leaseExpires, token);
      this.stmt('UPDATE exports SET lease_expires = ? WHERE runner_token = ?').run(leaseExpires, token);
    }).immediate();
  }

  /** Ask the process holding a long-lived operation's locks (an export) to stop it and release them. */
  requestOpStop(id: string): void {
    this.stmt('INSERT OR IGNORE INTO op_stop_requests (id, requested_at) VALUES (?, ?)').run(id, new Date().toISOString());
  }


  requestOpCall(id: string, opId: string, call: string): boolean {
    return this.stmt(`INSERT INTO op_calls (id, op_id, call, requested_at) SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM op_locks WHERE id = ?)`)
      .run(id, opId, call, new Date().toISOString(), opId).changes > 0;
  }

  takeOpRequests(opIds: readonly string[]): OpRequests {
    // Read first: a process polls this every 250 ms, and a write transaction each time would
    // queue behind (and hold up) every writer of the file. Each one is taken by one write.
    const ids = JSON.stringify(opIds);
    const stops = (this.stmt('SELECT id FROM op_stop_requests WHERE id IN (SELECT value FROM json_each(?))').all(ids) as { id: string }[])
      .filter((r) => this.stmt('DELETE FROM op_stop_requests WHERE id = ?').run(r.id).changes > 0).map((r) => r.id);
    const calls = (this.stmt('SELECT id, op_id, call FROM op_calls WHERE op_id IN (SELECT value FROM json_each(?)) AND taken = 0 ORDER BY requested_at')
      .all(ids) as { id: string; op_id: string; call: string }[])
      .filter((c) => this.stmt('UPDATE op_calls SET taken = 1 WHERE id = ? AND taken = 0').run(c.id).changes > 0)
      .map((c) => ({ id: c.id, opId: c.op_id, call: c.call }));
    return { stops, calls };
  }

  answerOpCall(id: string, answer: string): void {
    this.stmt('UPDATE op_calls SET answer = ? WHERE id = ?').run(answer, id);
  }

  takeOpCallAnswer(id: string): string | undefined | null {
    return this.db.transaction(() => {
      const row = this.stmt('SELECT answer FROM op_calls WHERE id = ?').get(id) as { answer: string | null } | undefined;
      if (!row) return null;
      if (row.answer === null) return undefined;
      this.stmt('DELETE FROM op_calls WHERE id = ?').run(id);
      return row.answer;
    }).immediate();
  }

  withdrawOpCall(id: string): boolean {
    return this.stmt('DELETE FROM op_calls WHERE id = ? AND taken = 0').run(id).changes > 0;
  }

  sweepOpCalls(before: string): number {
    return this.stmt('DELETE FROM op_calls WHERE requested_at < ?').run(before).changes;
  }

  insertExport(e: ExportRecord): void {
    this.stmt(`INSERT OR REPLACE INTO exports (id, name, ref, uri, read_only, owner, role, runner_pid, runner_token, started_at, runner_host, lease_expires)
      VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`)
      .run(e.id, e.name, e.ref, e.uri, e.readOnly ? 1 : 0, e.owner, e.role, e.runnerPid, e.runnerToken, e.startedAt, e.runnerHost, e.leaseExpires);
  }

  deleteExport(id: string): void {
    this.stmt('DELETE FROM exports WHERE id = ?').run(id);
  }

  listExports(): ExportRecord[] {
    const rows = this.stmt('SELECT * FROM exports ORDER BY name, id').all() as {
      id: string; name: string; ref: string; uri: string; read_only: number; owner: string; role: string; runner_pid: number; runner_token: string; started_at: string;
      runner_host: string; lease_expires: number;
    }[];
    return rows.map((r) => ({
      id: r.id, name: r.name, ref: r.ref, uri: r.uri, readOnly: r.read_only !== 0, owner: r.owner, role: r.role === 'tenant' ? 'tenant' : 'admin',
      runnerPid: r.runner_pid, runnerToken: r.runner_token, runnerHost: r.runner_host, leaseExpires: r.lease_expires, startedAt: r.started_at,
    }));
  }

  listOpLocks(): OpLockRecord[] {
    // rowid: the order of claims (OpLockRecord.seq). Rows that are there together were inserted
    // in that order: a new row's rowid is above every row's present then.
    return opLocksFromRows(this.stmt('SELECT rowid AS seq, * FROM op_locks ORDER BY id, rowid').all() as OpLockRow[]);
  }

  listMaintenance(): { key: string; principal: string; reason: string }[] {
    return this.stmt('SELECT key, principal, reason FROM maintenance ORDER BY key').all() as { key: string; principal: string; reason: string }[];
  }

  placeMaintenance(key: string, principal: string, reason: string): void {
    this.stmt('INSERT OR REPLACE INTO maintenance (key, principal, reason, created_at) VALUES (?, ?, ?, ?)').run(key, principal, reason, new Date().toISOString());
  }

  removeMaintenance(key: string): void {
    this.stmt('DELETE FROM maintenance WHERE key = ?').run(key);
  }

  setOwner(ref: string, owner: string): void {
    this.stmt('INSERT OR REPLACE INTO owners (ref, owner) VALUES (?, ?)').run(ref, owner);
  }

  getOwner(ref: string): string | undefined {
    return (this.stmt('SELECT owner FROM owners WHERE ref = ?').get(ref) as { owner: string } | undefined)?.owner;
  }

  deleteOwner(ref: string): void {
    this.stmt('DELETE FROM owners WHERE ref = ?').run(ref);
  }

  getOwners(refs: readonly string[]): Record<string, string> {
    const out: Record<string, string> = {};
    if (refs.length === 0) return out;
    for (const r of this.stmt('SELECT ref, owner FROM owners WHERE ref IN (SELECT value FROM json_each(?))').all(JSON.stringify(refs)) as { ref: string; owner: string }[]) out[r.ref] = r.owner;
    return out;
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}

function toRow(j: JobRecord): Row {
  return {
    id: j.id, type: j.type, status: j.status, executor: j.executor, backend: j.backend ?? null, ref: j.ref, owner: j.owner, owner_role: j.ownerRole,
    progress_current: Math.round(j.progress.current), progress_total: Math.round(j.progress.total), speed: Math.round(j.speed),
    error_code: j.error?.code ?? null, error_message: j.error?.message ?? null, cancelled: j.cancelled ? 1 : 0,
    params: JSON.stringify(j.params), plan: j.plan === undefined ? null : JSON.stringify(j.plan),
    checkpoint: j.checkpoint === undefined ? null : JSON.stringify(j.checkpoint), runner_pid: j.runnerPid,
    runner_token: j.runnerToken, request: j.request ? JSON.stringify(j.request) : null, locks: JSON.stringify(j.locks), created_at: j.createdAt, updated_at: j.updatedAt,
    runner_host: j.runnerHost, lease_expires: j.leaseExpires, seen_at: j.seenAt, fence: j.fence,
  };
}

function fromRow(r: Row): JobRecord {
  const rec: JobRecord = {
    id: r.id, type: r.type, status: r.status as JobStatus, executor: r.executor, ref: r.ref, owner: r.owner,
    progress: { current: r.progress_current, total: r.progress_total }, speed: r.speed, cancelled: r.cancelled === 1,
    params: JSON.parse(r.params) as Record<string, unknown>, createdAt: r.created_at, updatedAt: r.updated_at,
    runnerPid: r.runner_pid, runnerToken: r.runner_token, runnerHost: r.runner_host, leaseExpires: r.lease_expires, seenAt: r.seen_at, fence: r.fence,
    locks: JSON.parse(r.locks) as LockRequest[],
    ownerRole: r.owner_role === 'tenant' ? 'tenant' : 'admin',
  };
  if (r.backend !== null) rec.backend = r.backend;
  if (r.error_code !== null) rec.error = { code: r.error_code as ErrorCode, message: r.error_message ?? '' };
  if (r.plan !== null) rec.plan = JSON.parse(r.plan);
  if (r.checkpoint !== null) rec.checkpoint = JSON.parse(r.checkpoint);
  if (r.request !== null) rec.request = JSON.parse(r.request) as StoredRequest;
  return rec;
}
