import type { ClaimedLocks, ExportRecord, JobRecord, LockHolders, OpLockRecord, StoredRequest } from './records.js';

/** A runner as a job's record names it: a process (pid, a per-process token) on a host. */
export interface Runner {
  pid: number;
  token: string;
  host: string;
}

/**
 * The reads and writes of the broker's durable state. Every method is atomic on its own; inside
 * StateStore.transaction they are atomic together.
 *
 * Fencing: a job's record carries its runner's token and fencing token (`fence`). updateJob,
 * renewLease and releaseJob write only while both still match — false, and nothing written, once
 * another runner has taken the job over (claimJob, which hands out `fence + 1`) or it was deleted.
 */
/** Which jobs listJobs returns: `active`, those not concluded; `type`, those of that type (both: both). */
export interface JobFilter {
  active?: boolean;
  type?: string;
}

/** What StateOps.takeOpRequests takes: operations asked to stop, and calls made to operations. */
export interface OpRequests {
  stops: string[];
  calls: { id: string; opId: string; call: string }[];
}

export interface StateOps {
  getJob(id: string): Promise<JobRecord | undefined>;
  /** Every job, oldest first (created_at, then id); with `active`, only those not concluded (what lock checks and runners look at); with `type`, only those of it. */
  listJobs(filter?: JobFilter): Promise<JobRecord[]>;
  /** AlreadyExists if the id is taken. */
  insertJob(job: JobRecord): Promise<void>;
  /** The live fields (status, progress, speed, error, cancelled, checkpoint, runner, lease, updatedAt); fenced. */
  updateJob(job: JobRecord): Promise<boolean>;
  deleteJob(id: string): Promise<void>;
  /**
   * Take a job over from the runner `from` (its token, fence and lease as the caller read them,
   * when it judged the job orphaned): exactly one of several racing takers wins and gets the next
   * fencing token; the others get undefined — as does a taker whose view is stale (the runner
   * renewed its lease since, or the job concluded).
   */
  claimJob(id: string, from: { token: string; fence: number; leaseExpires: number }, to: Runner, leaseExpires: number): Promise<number | undefined>;
  /** Extend a runner's lease (ms since the epoch) and note it was seen now; fenced. */
  renewLease(id: string, token: string, fence: number, leaseExpires: number): Promise<boolean>;
  /** A runner gives a job up unconcluded, saving its checkpoint: the lease ends now (token RELEASED); fenced. */
  releaseJob(id: string, token: string, fence: number, checkpoint: unknown): Promise<boolean>;
  /**
   * Replace a job's checkpoint, and nothing else, while it is still `expected` (compared as JSON):
   * unfenced, for a change that only takes away from what a record promises (a live copy's
   * write-intent record dropped by whoever ends it). False, nothing written, if it changed.
   */
  replaceCheckpoint(id: string, expected: unknown, next: unknown): Promise<boolean>;

  /** Ask a job's runner to apply a verb. A pending cancel is never replaced by another verb. */
  setRequest(id: string, request: StoredRequest): Promise<void>;
  /** Read and clear a job's pending request. */
  takeRequest(id: string): Promise<StoredRequest | undefined>;

  /**
   * What a lock check reads, in one go (one statement where the store can): the jobs not
   * concluded (as listJobs({ active: true })), every operation's locks (listOpLocks) and every
   * maintenance lock (listMaintenance). With `keys`, only those holding a lock on one of them
   * (a job or an operation whole, with all its locks); with `prefixes` too, those holding a lock on a
   * key that starts with one of them (`backend/volume@`: a volume's snapshots).
   */
  lockHolders(keys?: string[], prefixes?: string[]): Promise<LockHolders>;
  /**
   * The locks of a short (or long-lived) operation, visible to every process sharing the state.
   * Not serialized with claims: the order of claims (OpLockRecord.seq) holds only for claimOpLocks.
   */
  insertOpLocks(op: OpLockRecord): Promise<void>;
  /**
   * insertOpLocks, then lockHolders, as one step serialized with every transaction on `locks`
   * (one round trip where the store can): of two brokers claiming locks at once, the later sees
   * the earlier's, so they cannot both find the way clear. The holders are those of the claimed
   * keys (lockHolders(keys)), the claim itself included; the caller judges conflicts and, finding
   * one, deletes its claim (deleteOpLocks). With them, the owner records of the claimed keys, read
   * in the same step. `also`: the holders of more keys, and of keys starting with `prefixes`, read
   * in the same step (lockHolders(keys, prefixes)).
   */
  claimOpLocks(op: OpLockRecord, also?: { keys?: string[]; prefixes?: string[] }): Promise<ClaimedLocks>;
  /** Remove the locks of an operation (or of several at once) and any stop request for it. */
  deleteOpLocks(id: string | readonly string[]): Promise<void>;
  listOpLocks(): Promise<OpLockRecord[]>;
  /** Extend the lease of every operation and export of the runner `token` (its heartbeat). */
  renewOps(token: string, leaseExpires: number): Promise<void>;
  /** Ask the process holding a long-lived operation (an export) to stop it. */
  requestOpStop(id: string): Promise<void>;
  /**
   * Ask the process holding a long-lived operation (an export) to make a call on this one's
   * behalf (`call`: JSON, a snapshot of the volume it serves), under the id `id`: false, and
   * nothing recorded, when the operation holds no locks (any more). Calls not taken yet go with
   * the operation's locks (deleteOpLocks); a taken one stays for its answer.
   */
  requestOpCall(id: string, opId: string, call: string): Promise<boolean>;
  /**
   * Take what other processes asked of this process's long-lived operations `opIds`, each once:
   * the stop requests (read and cleared: the ids asked to stop), and the calls not taken yet,
   * oldest first. One step for all of a process's exports (it polls this every 250 ms).
   */
  takeOpRequests(opIds: readonly string[]): Promise<OpRequests>;
  /** Answer a call taken (JSON). */
  answerOpCall(id: string, answer: string): Promise<void>;
  /** A call's answer, removed with the call; undefined while it has none, null when the call is gone unanswered (its operation ended before taking it). */
  takeOpCallAnswer(id: string): Promise<string | undefined | null>;
  /** Remove a call not taken yet (the asker gave up waiting): false if it was taken (or is gone). */
  withdrawOpCall(id: string): Promise<boolean>;
  /** Remove the calls made before `before` (ISO time), answered or not: their askers stopped waiting long ago (an asker that died). How many. */
  sweepOpCalls(before: string): Promise<number>;

  /** Record an export (replacing one of the same id). */
  insertExport(e: ExportRecord): Promise<void>;
  deleteExport(id: string): Promise<void>;
  /** Exports by name, then id. */
  listExports(): Promise<ExportRecord[]>;

  /** Maintenance locks by key. */
  listMaintenance(): Promise<{ key: string; principal: string; reason: string }[]>;
  /** Place (or replace) a maintenance lock. */
  placeMaintenance(key: string, principal: string, reason: string): Promise<void>;
  removeMaintenance(key: string): Promise<void>;

  setOwner(ref: string, owner: string): Promise<void>;
  getOwner(ref: string): Promise<string | undefined>;
  /** The owner records of `refs` in one read (a ref without one is absent): a listing's page. */
  getOwners(refs: readonly string[]): Promise<Record<string, string>>;
  deleteOwner(ref: string): Promise<void>;
}

/**
 * Where the broker keeps its state: SQLite in the state directory (one host; the default) or
 * PostgreSQL (brokers on many hosts sharing one database). Both pass one contract suite
 * (test/state/). A store's schema is created on open and migrated from older versions; a
 * database written by a newer build is refused.
 */
export interface StateStore extends StateOps {
  readonly kind: 'sqlite' | 'postgres';
  /**
   * Run `fn` in one transaction, serialized against every other transaction on the same database
   * that takes the same `lock` (a lock checks then inserts: two brokers that both check for a
   * conflict and then insert cannot both succeed). Rolled back if `fn` throws. Nested calls are
   * not allowed; `tx` is valid only until `fn` resolves.
   */
  transaction<T>(lock: TransactionLock, fn: (tx: StateOps) => Promise<T>): Promise<T>;
  close(): Promise<void>;
}

/** What a transaction serializes on: every lock-taking step takes `locks`. */
export type TransactionLock = 'locks';
