import { realpathSync } from 'node:fs';
import { JobStore } from '../../jobs/job-store.js';
import { KeyedMutex } from '../../keyed-mutex.js';
import { AlreadyExists, Busy, FailedPrecondition, InternalError } from '../../model/errors.js';
import type { ExportRecord, JobRecord, OpLockRecord, StoredRequest } from '../records.js';
import type { JobFilter, Runner, StateOps, StateStore, TransactionLock } from '../state-store.js';

/**
 * The embedded StateStore: one SQLite file in the state directory (WAL), shared by the processes
 * of one host. Its statements run synchronously (better-sqlite3); calls are queued one at a time
 * so that an open transaction, which awaits its caller between statements, sees no statement of
 * another call of this process. The queue is per database file, not per store: a second store on
 * the same file in this process waits for it in the queue, where SQLite's busy wait would block the
 * event loop that the open transaction needs to finish (and fail with "database is locked" after
 * the busy timeout). Across processes, a transaction is BEGIN IMMEDIATE: SQLite's one writer lock
 * serializes them (waiting up to the busy timeout).
 */
export class SqliteStateStore implements StateStore {
  readonly kind = 'sqlite';
  private readonly db: JobStore;
  private readonly file: string;
  private readonly queue: KeyedMutex;
  private readonly ops: StateOps;
  private closed = false;

  /** `opts.busyTimeoutMs`: how long a statement waits for another process's lock before Busy (default 5 s; tests). */
  constructor(file: string, opts: { busyTimeoutMs?: number } = {}) {
    this.db = new JobStore(file, opts.busyTimeoutMs);
    // ':memory:' is a database of its own for every connection.
    this.file = file === ':memory:' ? `:memory:${++memories}` : realpathSync(file);
    this.queue = openQueue(this.file);
    this.ops = syncOps(this.db);
  }

  transaction<T>(_lock: TransactionLock, fn: (tx: StateOps) => Promise<T>): Promise<T> {
    return this.queue.run(['db'], async () => {
      try {
        this.db.begin();
      } catch (e) {
        throw typed(e, this.file);
      }
      let live = true;
      // Calls through a tx that outlived its transaction fail instead of running outside it.
      const tx = guard(this.ops, () => {
        if (!live) throw new FailedPrecondition('a state transaction was used after it ended');
      });
      try {
        const out = await fn(tx);
        this.db.commit();
        return { out, durable: this.db.takeDurable() };
      } catch (e) {
        this.db.rollback();
        this.db.takeDurable();
        throw typed(e, this.file);
      } finally {
        live = false;
      }
    }).then((r) => this.synced(r));
  }

  private one<T>(fn: (ops: StateOps) => Promise<T>): Promise<T> {
    return this.queue.run(['db'], async () => {
      try {
        const out = await fn(this.ops);
        return { out, durable: this.db.takeDurable() };
      } catch (e) {
        this.db.takeDurable();
        throw typed(e, this.file);
      }
    }).then((r) => this.synced(r));
  }

  /** A call's outcome once what it wrote durably is synced (outside the queue: the next statements go on meanwhile). */
  private async synced<T>(r: { out: T; durable: boolean }): Promise<T> {
    if (r.durable) {
      try {
        await this.db.syncLog();
      } catch (e) {
        throw typed(e, this.file);
      }
    }
    return r.out;
  }

  getJob(id: string) { return this.one((o) => o.getJob(id)); }
  listJobs(filter?: JobFilter) { return this.one((o) => o.listJobs(filter)); }
  insertJob(job: JobRecord) { return this.one((o) => o.insertJob(job)); }
  updateJob(job: JobRecord) { return this.one((o) => o.updateJob(job)); }
  deleteJob(id: string) { return this.one((o) => o.deleteJob(id)); }
  claimJob(id: string, from: { token: string; fence: number; leaseExpires: number }, to: Runner, leaseExpires: number) { return this.one((o) => o.claimJob(id, from, to, leaseExpires)); }
  renewLease(id: string, token: string, fence: number, leaseExpires: number) { return this.one((o) => o.renewLease(id, token, fence, leaseExpires)); }
  releaseJob(id: string, token: string, fence: number, checkpoint: unknown) { return this.one((o) => o.releaseJob(id, token, fence, checkpoint)); }
  replaceCheckpoint(id: string, expected: unknown, next: unknown) { return this.one((o) => o.replaceCheckpoint(id, expected, next)); }
  setRequest(id: string, request: StoredRequest) { return this.one((o) => o.setRequest(id, request)); }
  takeRequest(id: string) { return this.one((o) => o.takeRequest(id)); }
  lockHolders(keys?: string[], prefixes?: string[]) { return this.one((o) => o.lockHolders(keys, prefixes)); }
  insertOpLocks(op: OpLockRecord) { return this.one((o) => o.insertOpLocks(op)); }
  claimOpLocks(op: OpLockRecord, also?: { keys?: string[]; prefixes?: string[] }) { return this.one((o) => o.claimOpLocks(op, also)); }
  deleteOpLocks(id: string | readonly string[]) { return this.one((o) => o.deleteOpLocks(id)); }
  listOpLocks() { return this.one((o) => o.listOpLocks()); }
  renewOps(token: string, leaseExpires: number) { return this.one((o) => o.renewOps(token, leaseExpires)); }
  requestOpStop(id: string) { return this.one((o) => o.requestOpStop(id)); }
  requestOpCall(id: string, opId: string, call: string) { return this.one((o) => o.requestOpCall(id, opId, call)); }
  takeOpRequests(opIds: readonly string[]) { return this.one((o) => o.takeOpRequests(opIds)); }
  answerOpCall(id: string, answer: string) { return this.one((o) => o.answerOpCall(id, answer)); }
  takeOpCallAnswer(id: string) { return this.one((o) => o.takeOpCallAnswer(id)); }
  withdrawOpCall(id: string) { return this.one((o) => o.withdrawOpCall(id)); }
  sweepOpCalls(before: string) { return this.one((o) => o.sweepOpCalls(before)); }
  insertExport(e: ExportRecord) { return this.one((o) => o.insertExport(e)); }
  deleteExport(id: string) { return this.one((o) => o.deleteExport(id)); }
  listExports() { return this.one((o) => o.listExports()); }
  listMaintenance() { return this.one((o) => o.listMaintenance()); }
  placeMaintenance(key: string, principal: string, reason: string) { return this.one((o) => o.placeMaintenance(key, principal, reason)); }
  removeMaintenance(key: string) { return this.one((o) => o.removeMaintenance(key)); }
  setOwner(ref: string, owner: string) { return this.one((o) => o.setOwner(ref, owner)); }
  getOwner(ref: string) { return this.one((o) => o.getOwner(ref)); }
  getOwners(refs: readonly string[]) { return this.one((o) => o.getOwners(refs)); }
  deleteOwner(ref: string) { return this.one((o) => o.deleteOwner(ref)); }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.queue.run(['db'], async () => this.db.close());
    closeQueue(this.file);
  }
}

/** The queue of each database file open in this process, and how many stores use it. */
const queues = new Map<string, { queue: KeyedMutex; stores: number }>();
let memories = 0;

function openQueue(file: string): KeyedMutex {
  const q = queues.get(file) ?? { queue: new KeyedMutex(), stores: 0 };
  q.stores++;
  queues.set(file, q);
  return q.queue;
}

function closeQueue(file: string): void {
  const q = queues.get(file);
  if (q && --q.stores === 0) queues.delete(file);
}

/**
 * The store's operations over the synchronous JobStore, as promises. The writes someone is told
 * of (a job's record, an owner, a maintenance lock, a cancel) are synced before their call
 * resolves (JobStore.durably, then syncLog); leases, operations' and exports' rows are not: they
 * mean nothing after a restart.
 */
function syncOps(db: JobStore): StateOps {
  return {
    getJob: async (id) => db.get(id),
    listJobs: async (filter) => db.list(filter),
    insertJob: async (job) => {
      try {
        db.durably(() => db.insert(job));
      } catch (e) {
        if ((e as { code?: string }).code === 'SQLITE_CONSTRAINT_PRIMARYKEY') throw new AlreadyExists(`job ${job.id} already exists`, { ref: job.id });
        throw e;
      }
    },
    updateJob: async (job) => db.durably(() => db.update(job)),
    deleteJob: async (id) => db.durably(() => db.delete(id)),
    claimJob: async (id, from, to, leaseExpires) => db.durably(() => db.claim(id, from, to, leaseExpires)),
    renewLease: async (id, token, fence, leaseExpires) => db.renew(id, token, fence, leaseExpires),
    releaseJob: async (id, token, fence, checkpoint) => db.durably(() => db.release(id, token, fence, checkpoint)),
    replaceCheckpoint: async (id, expected, next) => db.durably(() => db.replaceCheckpoint(id, expected, next)),
    setRequest: async (id, request) => db.durably(() => db.setRequest(id, request)),
    takeRequest: async (id) => db.takeRequest(id),
    lockHolders: async (keys, prefixes) => db.lockHolders(keys, prefixes),
    insertOpLocks: async (op) => db.insertOpLocks(op, () => undefined),
    claimOpLocks: async (op, also) => db.claimOpLocks(op, also),
    deleteOpLocks: async (id) => db.deleteOpLocks(id),
    listOpLocks: async () => db.listOpLocks(),
    renewOps: async (token, leaseExpires) => db.renewOps(token, leaseExpires),
    requestOpStop: async (id) => db.requestOpStop(id),
    requestOpCall: async (id, opId, call) => db.requestOpCall(id, opId, call),
    takeOpRequests: async (opIds) => db.takeOpRequests(opIds),
    answerOpCall: async (id, answer) => db.answerOpCall(id, answer),
    takeOpCallAnswer: async (id) => db.takeOpCallAnswer(id),
    withdrawOpCall: async (id) => db.withdrawOpCall(id),
    sweepOpCalls: async (before) => db.sweepOpCalls(before),
    insertExport: async (e) => db.insertExport(e),
    deleteExport: async (id) => db.deleteExport(id),
    listExports: async () => db.listExports(),
    listMaintenance: async () => db.listMaintenance(),
    placeMaintenance: async (key, principal, reason) => db.durably(() => db.placeMaintenance(key, principal, reason)),
    removeMaintenance: async (key) => db.durably(() => db.removeMaintenance(key)),
    setOwner: async (ref, owner) => db.durably(() => db.setOwner(ref, owner)),
    getOwner: async (ref) => db.getOwner(ref),
    getOwners: async (refs) => db.getOwners(refs),
    deleteOwner: async (ref) => db.deleteOwner(ref),
  };
}

/** `ops` with `check` run before every call. */
function guard(ops: StateOps, check: () => void): StateOps {
  const out = {} as Record<string, unknown>;
  for (const [k, f] of Object.entries(ops) as [string, (...a: unknown[]) => Promise<unknown>][]) {
    out[k] = async (...a: unknown[]) => {
      check();
      return f(...a);
    };
  }
  return out as unknown as StateOps;
}

/** SQLite's own errors as OffloadErrors (a busy database: Busy; the rest: Internal, with its code). */
function typed(e: unknown, file: string): unknown {
  const code = (e as { code?: unknown })?.code;
  if (typeof code !== 'string' || !code.startsWith('SQLITE_')) return e;
  const message = (e as Error).message;
  if (code === 'SQLITE_BUSY' || code.startsWith('SQLITE_BUSY_') || code === 'SQLITE_LOCKED') {
    return new Busy(`the state database ${file} stayed locked by another process past the busy timeout: ${message}`, {
      ref: file, hint: 'try again; a process holding a transaction that long is stuck', cause: e, data: { sqlite: code },
    });
  }
  return new InternalError(`the state database ${file}: ${message}`, { ref: file, cause: e, data: { sqlite: code } });
}
