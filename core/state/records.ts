/**
 * What the broker persists, as plain records: jobs (with their runner's lease and fencing
 * token), the locks of short operations, exports, and the verbs one process asks of another.
 * Both state stores (core/state/) keep exactly these.
 */
import type { JobInfo } from '../jobs/job.js';
import type { LockRequest } from '../locks/lock-manager.js';

/** A job as stored: its info plus what a restarted broker needs to resume or fail it. */
export interface JobRecord extends JobInfo {
  /** The backend whose task this is (`resumeTask` is asked), or undefined for host tasks. */
  backend?: string;
  /** Last checkpoint saved by the task (JSON). */
  checkpoint?: unknown;
  /** The process running it: pid and a per-process token (pids are reused), and its host. */
  runnerPid: number;
  runnerToken: string;
  runnerHost: string;
  /**
   * The runner's lease: it renews `leaseExpires` (ms since the epoch) while it runs the job, and
   * `seenAt` with it. Past the expiry another runner may take the job over.
   */
  leaseExpires: number;
  seenAt: number;
  /**
   * The fencing token: grows by one on every takeover. Every write a runner makes to the record
   * names the token it holds, and is refused once another runner has taken over.
   */
  fence: number;
  /** A verb asked from another process (`offload jobs cancel` while `offload stream` runs). */
  request?: StoredRequest;
  /** The locks the job holds, taken again when it is resumed. */
  locks: LockRequest[];
  /** The role of `owner`, so a resumed job holds its locks as the same principal. */
  ownerRole: 'admin' | 'tenant';
}

/** The locks a short operation holds while it runs. */
export interface OpLockRecord {
  id: string;
  locks: LockRequest[];
  principal: string;
  role: 'admin' | 'tenant';
  description: string;
  runnerPid: number;
  runnerToken: string;
  /** The runner's host (as a job's runnerHost) and its lease, renewed with its jobs' (StateOps.renewOps). */
  runnerHost: string;
  leaseExpires: number;
  /**
   * Where the store put it in the order of claims (read back, never written): of two operations
   * whose locks conflict, the one with the greater `seq` was claimed later and saw the other.
   */
  seq?: number;
}

/** An NBD export as other processes sharing the state see it (`offload nbd list`). */
export interface ExportRecord {
  /** Its lock holder id, `export:NAME#TAG`. */
  id: string;
  name: string;
  ref: string;
  uri: string;
  readOnly: boolean;
  owner: string;
  role: 'admin' | 'tenant';
  runnerPid: number;
  runnerToken: string;
  runnerHost: string;
  leaseExpires: number;
  startedAt: string;
}

/** Everything that may hold a lock, as one read: the jobs not concluded, operations' locks, maintenance locks. */
export interface LockHolders {
  jobs: JobRecord[];
  ops: OpLockRecord[];
  maintenance: { key: string; principal: string; reason: string }[];
}

/** What a claim of an operation's locks reads (StateOps.claimOpLocks): the holders of its keys and their owner records. */
export interface ClaimedLocks extends LockHolders {
  /** The owner record of each claimed key that has one. */
  owners: Record<string, string>;
}

/** The runner token of a job that its runner gave up (JobStore.release). */
export const RELEASED = 'released';

export type StoredRequest = { verb: 'cancel' | 'pause' | 'resume' | 'complete' } | { verb: 'set-speed'; speed: number };

/** An operation's lock as both stores keep it: one row per lock. */
export interface OpLockRow {
  id: string; key: string; mode: string; principal: string; role: string; description: string; runner_pid: number; runner_token: string;
  runner_host: string; lease_expires: number; seq?: number;
}

/** Rows (ordered by id, then insertion) grouped into one record per operation. */
export function opLocksFromRows(rows: OpLockRow[]): OpLockRecord[] {
  const byId = new Map<string, OpLockRecord>();
  for (const r of rows) {
    const op = byId.get(r.id) ?? {
      id: r.id, principal: r.principal, role: r.role === 'tenant' ? 'tenant' : 'admin', description: r.description,
      runnerPid: r.runner_pid, runnerToken: r.runner_token, runnerHost: r.runner_host, leaseExpires: r.lease_expires, locks: [],
      ...(r.seq !== undefined && r.seq !== null ? { seq: Number(r.seq) } : {}),
    };
    op.locks.push({ key: r.key, mode: r.mode === 'shared' ? 'shared' : 'exclusive' });
    byId.set(r.id, op);
  }
  return [...byId.values()];
}
