import { randomBytes } from 'node:crypto';
import type { Logger } from '../backend/plugin.js';
import { diskUsers, snapshotsRead } from '../locks/disks-in-use.js';
import { holderHint, holderKind, lockModesConflict, type LockHolder, type LockManager, type LockMode, type LockRequest, type Outside, type Publish } from '../locks/lock-manager.js';
import type { Principal } from '../locks/principal.js';
import { Busy, FailedPrecondition, InvalidArgument, NotFound, toOffloadError } from '../model/errors.js';
import { RELEASED, type ExportRecord, type JobRecord, type OpLockRecord } from '../state/records.js';
import type { StateOps, StateStore } from '../state/state-store.js';
import { ACTIVE_STATUSES } from './job-states.js';
import type { Job, JobInfo } from './job.js';
import type { JobTask } from './job-task.js';
import { ManagedJob } from './managed-job.js';
import { OpClaims } from './op-claims.js';
import { maintenanceLock, OpRows } from './op-rows.js';
import { RemoteJob, recordToInfo } from './remote-job.js';
import { keysToRead, withWholeVolumes } from '../locks/whole-volume.js';
import { holderAlive, liveTokens, runnerGone, runnerHost } from './runner.js';
import { RunnerLocks } from './runner-lock.js';

export interface StartJobRequest {
  task: JobTask;
  /** The ref the job works on. */
  ref: string;
  /** `backend:NAME` or `host`. */
  executor: string;
  /** The backend to ask for `resumeTask` after a restart (absent for host tasks). */
  backend?: string;
  principal: Principal;
  plan?: unknown;
  locks: LockRequest[];
  speed?: number;
  /** The holders whose locks the job's may overlap (LockHolder.within): a live copy's exports. */
  within?: string | readonly string[];
  /**
   * Checks that count only under the job's locks (a tenant's ownership of what it reads and
   * writes: the volume may have changed hands while the job waited for them). Run once they are
   * held; if one throws, they are released and the job is not started.
   */
  check?: () => Promise<void>;
}

/**
 * Rebuilds the task of a stored job after a restart; undefined when it cannot be resumed, or an
 * Unresumable saying why (and whether what the job was for had happened already). `stopped`: the
 * runner it was taken from, and whether that process is known to have ended (it ran on this host
 * and its pid is gone; a runner elsewhere, or one that gave the job up, may still act).
 */
export type TaskResolver = (record: JobRecord, stopped: StoppedRunner) => Promise<JobTask | Unresumable | undefined>;

/** The runner a job was taken over from. */
export interface StoppedRunner {
  host: string;
  pid: number;
  /** Its process ran on this host and has ended. */
  gone: boolean;
}

/** A job that a restart cannot resume: why, and whether it is concluded as a success all the same. */
export interface Unresumable {
  why: string;
  /** What the job was for happened before its runner stopped (a live copy's recorded switch-over). */
  succeeded?: boolean;
  /** The checkpoint to conclude it with, in place of the one it has (a promise it can no longer keep taken out). */
  checkpoint?: unknown;
}

/** A job's lease by default (the config's `leaseSeconds`). */
export const DEFAULT_LEASE_MS = 15_000;

/** How long a call to an export stays in the store, answered or not: far longer than any asker waits (lockWaitSeconds). */
const OP_CALL_RETENTION_MS = 86_400_000;

/** What a runner's job life shows a service's metrics: takeovers, and writes refused by fencing. */
export type JobEventHook = (e:
  | { type: 'takeover'; job: string; fence: number }
  | { type: 'fenced'; job: string; why: string }
  /** A job this broker runs moved `bytes` further (its progress went forward here), through the host or offloaded (executor `backend:NAME`). */
  | { type: 'processed'; job: string; executor: string; bytes: number }) => void;

/** Whether this broker can run a job at all (it configures the job's backends): undefined if so, else why not. */
export type JobPlacement = (record: JobRecord) => string | undefined;

export interface JobManagerOptions {
  /** Which orphaned jobs this manager may take over (default: all). */
  placement?: JobPlacement;
  /**
   * A concluded job's record is about to be deleted (dismissed): what its being in the history
   * vouched for must go first (a crashed live copy resumes only if no job wrote its volumes
   * since, which it learns from the records). A failure fails the dismissal.
   */
  beforeDismiss?: (record: JobRecord) => Promise<void>;
  /** Told of every takeover this manager wins, and every job it loses to fencing. */
  onEvent?: JobEventHook;
  /** How often a job saves its checkpoint at most (JobRunOptions.checkpointEveryMs). */
  checkpointEveryMs?: number;
  /** How long a runner's lease on a job lasts without renewal (default 15 s); renewed every third of it. */
  leaseMs?: number;
  /**
   * How long a job's start waits for its locks — in line behind other brokers' operations, or for
   * tenants an administrator's job preempts — before it is refused Busy (default 30 s).
   */
  lineWaitMs?: number;
  /**
   * This host's id (the config's `hostId`): unique among the machines sharing the state, stable
   * across boots. A runner recorded under it in an earlier boot is known gone at once.
   */
  hostId?: string;
  /**
   * Where this manager holds its runner lock, and finds those of the other runners of this
   * machine (`<state>/runners`, RunnerLocks): one whose lock is free is gone, whatever its pid
   * namespace or boot. Absent: runners are judged by pid and lease only.
   */
  runnerLockDir?: string;
}

/**
 * Starts jobs under their locks and runs them under a lease (renewed while they run, with a
 * fencing token on every write), shows other runners' jobs, and takes over orphaned ones —
 * only when asked (recover, takeOver), never by listing or showing them.
 */
export class JobManager {
  private readonly token = randomBytes(8).toString('hex');
  /** This broker's host as its runners record it (runnerHost). */
  readonly host: string;
  private readonly running = new Map<string, ManagedJob>();
  private readonly leaseMs: number;
  private readonly lineWaitMs: number | undefined;
  private readonly checkpointEveryMs: number | undefined;
  private readonly heartbeat: NodeJS.Timeout;
  private adopter: NodeJS.Timeout | undefined;
  private sweeper: NodeJS.Timeout | undefined;
  private sweeping: Promise<void> | undefined;
  private closing = false;
  /** Jobs this manager is taking over right now (claimed, not running yet): not orphans. */
  private readonly adopting = new Map<string, Promise<unknown>>();
  /** Jobs this manager is recording right now (their record may be in the store before they run here): not orphans. */
  private readonly starting = new Set<string>();
  private readonly onEvent: JobEventHook | undefined;
  private readonly placement: JobPlacement;
  private readonly beforeDismiss: ((record: JobRecord) => Promise<void>) | undefined;
  /** This broker's operations and exports in the store: their rows, leases and removal. */
  private readonly rows: OpRows;
  /** Short operations' claims, kept a moment for the next ones. */
  private readonly claims: OpClaims;
  private readonly runnerLocks: RunnerLocks | undefined;

  constructor(
    private readonly store: StateStore,
    private readonly locks: LockManager,
    private readonly resolveTask: TaskResolver,
    private readonly logger: Logger,
    opts: JobManagerOptions = {},
  ) {
    this.leaseMs = opts.leaseMs ?? DEFAULT_LEASE_MS;
    this.host = runnerHost(opts.hostId);
    if (opts.lineWaitMs !== undefined && !(Number.isFinite(opts.lineWaitMs) && opts.lineWaitMs >= 0)) throw new InvalidArgument(`lineWaitMs must be a number of milliseconds ≥ 0, got ${String(opts.lineWaitMs)}`);
    this.lineWaitMs = opts.lineWaitMs;
    this.checkpointEveryMs = opts.checkpointEveryMs;
    this.onEvent = opts.onEvent;
    this.placement = opts.placement ?? (() => undefined);
    this.beforeDismiss = opts.beforeDismiss;
    this.runnerLocks = opts.runnerLockDir !== undefined ? new RunnerLocks(opts.runnerLockDir) : undefined;
    this.rows = new OpRows(store, this.token, this.host, this.leaseMs, (jobs, ops) => this.foreignOf(jobs, ops), () => this.holdLock());
    this.claims = new OpClaims((ids) => this.rows.withdrawMany(ids));
    liveTokens.add(this.token);
    this.heartbeat = setInterval(() => {
      const until = Date.now() + this.leaseMs;
      for (const job of this.running.values()) job.renewLease(until);
      this.rows.heartbeat(until);
    }, Math.max(50, Math.floor(this.leaseMs / 3)));
    this.heartbeat.unref();
  }

  /** This manager as a job's runner: its pid, token and host. */
  private get me(): { pid: number; token: string; host: string } {
    return { pid: process.pid, token: this.token, host: this.host };
  }

  /**
   * Whether nobody runs an active job: it was given up (released), its runner died on this host
   * (or in a boot of this machine that ended), or its lease ran out. A job of this process's other brokers is not orphaned while they live.
   */
  isOrphaned(r: JobRecord, now = Date.now()): boolean {
    if (!ACTIVE_STATUSES.includes(r.status)) return false;
    if (this.adopting.has(r.id) || this.starting.has(r.id)) return false;
    if (r.runnerToken === this.token) return !this.running.has(r.id);
    if (liveTokens.has(r.runnerToken)) return false;
    if (r.runnerToken === RELEASED) return true;
    if (r.runnerHost === this.host && r.runnerPid === process.pid) return true;
    if (runnerGone(r, this.host)) return true;
    if (r.leaseExpires <= now) return true;
    return this.lockGone(r.runnerToken);
  }

  /** Hold this manager's runner lock before anything names its token in the store (once). */
  private holdLock(): void {
    try {
      this.runnerLocks?.hold(this.token, this.host);
    } catch (e) {
      // Without it, others judge this runner by pid and lease, as before there were locks.
      this.logger.warn(`the runner lock cannot be held: ${toOffloadError(e).message}`);
    }
  }

  /** Whether a runner of this machine is gone: its lock is free (RunnerLocks). */
  private lockGone(token: string): boolean {
    return this.runnerLocks?.gone(token) ?? false;
  }

  /**
   * Whether the runner of a record ran on this machine: its lock file is in this state folder, or
   * runners recorded under its host worked with this folder (one that released the job at a
   * clean stop, before a container's restart or a reboot).
   */
  ranHere(r: { runnerToken: string; runnerHost: string }): boolean {
    return (this.runnerLocks?.isHere(r.runnerToken) || this.runnerLocks?.ranAs(r.runnerHost)) ?? false;
  }

  /**
   * Take the job's locks (Busy if they conflict), record it, and start it. Its locks are published
   * first as a claim under the job's id (others meeting it are refused, as by the job): a job
   * waiting for other brokers' short operations waits in line with it, so that their later
   * claims see it and do not cover its keys (whole-volume.ts) — without it, a broker running
   * operations on a volume back to back kept a job on one of its snapshots out until Busy. Once
   * recorded, the job's record holds the locks and the claim is withdrawn.
   */
  async start(req: StartJobRequest): Promise<Job> {
    const id = `${req.task.type}-${randomBytes(6).toString('hex')}`;
    const description = `${req.task.type} ${req.ref}`;
    let job: ManagedJob | undefined;
    let claim: Awaited<ReturnType<OpRows['claim']>> | undefined;
    const lease = await this.locks.acquirePublished(req.locks, {
      id,
      principal: req.principal,
      description,
      preempt: () => void job?.cancel().catch(() => undefined), // already ending
      ...(req.within !== undefined ? { within: req.within } : {}),
    }, async () => {
      claim = await this.rows.claim(id, req.locks, req.principal, description);
      // Released with the job; the claim is withdrawn once the record holds the locks (or start fails).
      return { ...claim, done: async () => undefined };
    }, this.lineWaitMs);
    const withdrawn = async (e: unknown): Promise<never> => {
      await lease.release();
      await claim?.withdraw();
      throw e;
    };
    try {
      await req.check?.();
    } catch (e) {
      return withdrawn(e);
    }
    const now = new Date().toISOString();
    const record: JobRecord = {
      id, type: req.task.type, status: 'created', executor: req.executor, ref: req.ref, owner: req.principal.id,
      progress: { current: 0, total: 0 }, speed: req.speed ?? 0, cancelled: false, createdAt: now, updatedAt: now,
      params: req.task.params, runnerPid: process.pid, runnerToken: this.token, runnerHost: this.host,
      leaseExpires: Date.now() + this.leaseMs, seenAt: Date.now(), fence: 1, locks: req.locks, ownerRole: req.principal.role,
      ...(req.plan !== undefined ? { plan: req.plan } : {}),
      ...(req.backend !== undefined ? { backend: req.backend } : {}),
    };
    // From its insert on, the record is this manager's: never an orphan to adopt, nor foreign.
    this.starting.add(id);
    try {
      // Check other processes' jobs and insert ours atomically (this process's locks are held
      // above). Claims made after ours saw it, and wait for it or left our keys alone.
      await this.store.transaction('locks', async (tx) => {
        await this.assertNoForeignConflict(tx, req.locks, id, claim?.seq, req.principal, req.within);
        await tx.insertJob(record);
      });
    } catch (e) {
      this.starting.delete(id);
      return withdrawn(toOffloadError(e, 'recording the job'));
    }
    job = new ManagedJob(record, req.task, this.store, (j) => {
      void lease.release();
      this.running.delete(j.id);
    }, this.runOptions());
    this.running.set(id, job);
    this.starting.delete(id);
    job.start();
    await claim?.withdraw(); // the record holds the keys now
    return job;
  }

  /**
   * Locks held outside this manager, from one read of the store: those of the jobs and operations
   * of other live brokers (on other hosts, in other processes, or in this one), and maintenance locks.
   */
  async outsideLocks(ops: StateOps = this.store, keys?: string[], claimedBefore?: number): Promise<Outside> {
    const holders = await ops.lockHolders(keys && keysToRead(keys));
    // Leaving out the claims made after `claimedBefore` (ours): they saw ours.
    const claims = claimedBefore === undefined ? holders.ops : holders.ops.filter((o) => o.seq === undefined || o.seq < claimedBefore);
    const foreign = this.foreignOf(holders.jobs, claims);
    return { foreign: keys ? withWholeVolumes(foreign, keys) : foreign, maintenance: holders.maintenance.map(maintenanceLock) };
  }

  /** Locks held by jobs and operations of other live brokers. */
  async foreignLocks(ops: StateOps = this.store, keys?: string[], claimedBefore?: number): Promise<{ key: string; mode: LockMode; holder: LockHolder }[]> {
    return (await this.outsideLocks(ops, keys, claimedBefore)).foreign;
  }

  private foreignOf(jobs: JobRecord[], opLocks: OpLockRecord[]): { key: string; mode: LockMode; holder: LockHolder }[] {
    const out: { key: string; mode: LockMode; holder: LockHolder }[] = [];
    const now = Date.now();
    for (const rec of jobs) {
      // Jobs this manager runs hold their locks in the lock manager already.
      if (!ACTIVE_STATUSES.includes(rec.status) || this.running.has(rec.id) || this.adopting.has(rec.id) || this.starting.has(rec.id)) continue;
      // An orphaned job keeps its locks until it is taken over and concludes: the volumes it was
      // changing (a half-streamed clone, a half-written target) stay as it left them.
      const orphaned = this.isOrphaned(rec, now);
      for (const l of rec.locks) {
        out.push({
          key: l.key, mode: l.mode,
          holder: {
            id: rec.id, principal: { id: rec.owner, role: rec.ownerRole },
            description: orphaned ? `${rec.type} ${rec.ref}, orphaned: take it over with \`offload jobs resume ${rec.id}\`` : `${rec.type} ${rec.ref} (${runnerText(rec, this.host)})`,
            ...(orphaned ? {} : { preempt: () => void this.store.setRequest(rec.id, { verb: 'cancel' }).catch(() => undefined) }),
          },
        });
      }
    }
    for (const op of opLocks) {
      if (op.runnerToken === this.token || !holderAlive(op, this.host, now, (t) => this.lockGone(t))) continue;
      for (const l of op.locks) {
        out.push({
          key: l.key, mode: l.mode,
          holder: {
            id: op.id, principal: { id: op.principal, role: op.role }, description: `${op.description} (${runnerText(op, this.host)})`,
            // A short operation ends by itself; a long-lived one (an export) is asked to stop.
            ...(holderKind(op.id).kind === 'export' ? { preempt: () => void this.store.requestOpStop(op.id).catch(() => undefined) } : {}),
          },
        });
      }
    }
    return out;
  }

  /** Make an export visible to other processes sharing the state (`offload nbd list`, `nbd stop`). Returns the removal. */
  recordExport(e: Omit<ExportRecord, 'runnerPid' | 'runnerToken' | 'runnerHost' | 'leaseExpires'>): Promise<() => Promise<void>> {
    return this.rows.recordExport(e);
  }

  /**
   * Publish an operation's locks (already granted in this process) so that other brokers see
   * them, and read the locks they hold, in one step of the store (StateOps.claimOpLocks): the
   * lock manager's Publish for exports (and, through publishShort, short operations). The caller
   * withdraws on a conflict, or waits in line (`recheck`): others meeting the claim meanwhile are
   * refused as by the export. A long-lived operation (an export) listens for another process's
   * request to stop it, and for its calls (a snapshot of the volume it serves: broker/op-calls.ts).
   */
  async publishOperation(id: string, locks: LockRequest[], principal: Principal, description: string, onStopRequest?: () => void,
    onCall?: (call: string) => Promise<string>): ReturnType<Publish> {
    const { outside, withdraw, recheck } = await this.rows.claim(id, locks, principal, description, onStopRequest, false, onCall);
    return { outside, withdraw, ...(recheck ? { recheck } : {}) };
  }

  /**
   * publishOperation for a short operation: its claim is kept for the next operations of this
   * broker on the same volumes (OpClaims), which then make no round trip to the store.
   */
  publishShort(id: string, locks: LockRequest[], principal: Principal, description: string): ReturnType<Publish> {
    return this.claims.claim(locks, () => this.rows.claim(id, locks, principal, description, undefined, true));
  }

  /** The owner record of a volume as this broker's live claims know it (OpClaims.owner): undefined if they do not. */
  knownOwner(key: string): string | null | undefined {
    return this.claims.owner(key);
  }

  /** This broker changed a volume's owner record (null: removed; undefined: a write that failed, its outcome unknown). */
  noteOwner(key: string, owner: string | null | undefined): void {
    this.claims.noteOwner(key, owner);
  }

  /** Exports served by other live brokers sharing this state (on other hosts, in other processes, or other brokers of this one). */
  async foreignExports(): Promise<ExportRecord[]> {
    const now = Date.now();
    return (await this.store.listExports()).filter((e) => e.runnerToken !== this.token && holderAlive(e, this.host, now, (t) => this.lockGone(t)));
  }

  /** Ask the process serving a foreign export to stop it. */
  requestExportStop(id: string): Promise<void> {
    return this.store.requestOpStop(id);
  }

  /** `within`: the holders the job works within (LockHolder.within), another process's export of a disk whose snapshot it reads among them. */
  private async assertNoForeignConflict(ops: StateOps, wanted: LockRequest[], id: string, claimedBefore?: number, principal?: Principal,
    within?: string | readonly string[]): Promise<void> {
    const outside = await this.outsideLocks(ops, wanted.map((w) => w.key), claimedBefore);
    // A maintenance lock placed while the job waited: tenants are kept off, administrators pass.
    const maintenance = principal?.role === 'tenant' ? outside.maintenance.find((m) => wanted.some((w) => w.key === m.key)) : undefined;
    if (maintenance) {
      throw new Busy(`${maintenance.key} is busy: it is under maintenance by ${maintenance.principal.id} (maintenance: ${maintenance.reason})`, {
        ref: maintenance.key, hint: 'wait until an administrator lifts the maintenance lock',
        data: { holder: `maintenance:${maintenance.key}`, mode: 'maintenance', principal: maintenance.principal.id, refused: id },
      });
    }
    for (const held of outside.foreign) {
      if (within !== undefined && (typeof within === 'string' ? within === held.holder.id : within.includes(held.holder.id))) continue;
      const w = wanted.find((r) => r.key === held.key && lockModesConflict(held.mode, r.mode));
      if (!w) continue;
      const who = holderKind(held.holder.id);
      throw new Busy(`${held.key} is busy: ${who.kind} ${who.name} (${held.holder.description}) holds ${held.mode === 'exclusive' ? 'an' : 'a'} ${held.mode} lock on it`, {
        ref: held.key, hint: holderHint(held.holder.id), data: { holder: held.holder.id, mode: held.mode, refused: id },
      });
    }
  }

  /** A job of this process, or a view of one that another process runs or ran. */
  async get(id: string): Promise<Job> {
    const local = this.running.get(id);
    if (local) return local;
    const rec = await this.store.getJob(id);
    if (!rec) throw new NotFound(`job ${id} does not exist`, { ref: id, hint: 'list jobs with `offload jobs list`' });
    return this.running.get(id) ?? new RemoteJob(rec, this.store, (r) => this.isOrphaned(r), this.beforeDismiss);
  }

  async list(): Promise<JobInfo[]> {
    const records = await this.store.listJobs();
    const now = Date.now();
    return records.map((r) => (this.running.get(r.id)?.info() ?? recordToInfo(r, this.isOrphaned(r, now))));
  }

  /**
   * Take over one orphaned job (`offload jobs resume ID`): resume it here from its checkpoint, or
   * conclude it as interrupted when it cannot be resumed. Busy while a runner holds its lease.
   */
  async takeOver(id: string): Promise<Job> {
    const rec = await this.store.getJob(id);
    if (!rec) throw new NotFound(`job ${id} does not exist`, { ref: id, hint: 'list jobs with `offload jobs list`' });
    if (!ACTIVE_STATUSES.includes(rec.status)) throw new FailedPrecondition(`job ${id} has concluded: there is nothing to take over`, { ref: id });
    const pending = this.adopting.get(id);
    if (pending) {
      await pending;
      return this.get(id);
    }
    if (!this.isOrphaned(rec)) {
      if (this.running.has(id)) return this.running.get(id)!;
      const left = Math.max(0, Math.ceil((rec.leaseExpires - Date.now()) / 1000));
      throw new Busy(`job ${id} is run by ${runnerText(rec, this.host)}, last seen ${ago(rec.seenAt)}; its lease ends in ${left} s unless renewed`, {
        ref: id, hint: 'follow it with `offload jobs wait ID`, or take it over once its runner has stopped', data: { runnerHost: rec.runnerHost, runnerPid: rec.runnerPid },
      });
    }
    const elsewhere = this.placement(rec);
    if (elsewhere !== undefined) {
      throw new FailedPrecondition(`job ${id} cannot be taken over here: ${elsewhere}`, { ref: id, hint: 'take it over from a broker that can reach its volumes' });
    }
    const outcome = await this.adopt(rec);
    if (outcome === 'lost') throw new Busy(`job ${id} was taken over by another runner just now`, { ref: id, hint: 'see who runs it with `offload jobs show ID`' });
    return this.get(id);
  }

  /**
   * Be a runner for the jobs of every process sharing the state (what `offload serve` does): every
   * `everyMs`, take over orphaned jobs — those whose runner died, gave them up, or let its lease
   * run out — while fewer than `maxJobs` run here. Ends with close().
   */
  adoptOrphans(opts: { everyMs?: number; maxJobs?: number } = {}): void {
    const max = opts.maxJobs ?? 4;
    let scanning = false;
    this.adopter ??= setInterval(() => {
      if (scanning || this.closing) return;
      scanning = true;
      void (async () => {
        const records = await this.store.listJobs({ active: true });
        const now = Date.now();
        for (const rec of records) {
          if (this.running.size >= max || this.closing) break;
          if (this.isOrphaned(rec, now) && this.placement(rec) === undefined) await this.adopt(rec).catch((e: unknown) => this.logger.warn('taking over a job failed', { job: rec.id, error: toOffloadError(e).message }));
        }
      })().catch((e: unknown) => this.logger.warn('looking for orphaned jobs failed', { error: toOffloadError(e).message }))
        .finally(() => { scanning = false; });
    }, opts.everyMs ?? Math.max(100, Math.floor(this.leaseMs / 3)));
    this.adopter.unref();
  }

  /**
   * Dismiss the concluded jobs that have not changed for `retentionMs` (a long-running broker:
   * once now, then every `everyMs`, default an hour; no `retentionMs`: none), but those `keep`
   * holds on to — each as a user's dismissal is (beforeDismiss first) — and drop the calls to
   * exports a day old. Brokers sharing a store may sweep it at once: a job another dismissed
   * first is passed over.
   */
  sweepConcluded(opts: { retentionMs?: number; everyMs?: number; keep?: (rec: JobRecord) => boolean }): void {
    const sweep = () => {
      if (this.sweeping || this.closing) return;
      this.sweeping = (async () => {
        // Calls to exports whose askers died before reading the answer (an asker waits lockWaitSeconds).
        await this.store.sweepOpCalls(new Date(Date.now() - OP_CALL_RETENTION_MS).toISOString());
        if (opts.retentionMs === undefined) return;
        const before = new Date(Date.now() - opts.retentionMs).toISOString();
        for (const rec of await this.store.listJobs()) {
          if (this.closing) break;
          if (rec.status !== 'concluded' || rec.updatedAt >= before || opts.keep?.(rec)) continue;
          const job = await this.get(rec.id).catch(() => undefined);
          await job?.dismiss().catch((e: unknown) => {
            if (!(e instanceof NotFound)) this.logger.warn('dismissing a concluded job failed', { job: rec.id, error: toOffloadError(e).message });
          });
        }
      })().catch((e: unknown) => this.logger.warn('looking for concluded jobs to dismiss failed', { error: toOffloadError(e).message }))
        .finally(() => { this.sweeping = undefined; });
    };
    if (this.sweeper) return;
    this.sweeper = setInterval(sweep, opts.everyMs ?? 3_600_000);
    this.sweeper.unref();
    sweep();
  }

  /**
   * Jobs left active by a process that is gone: resume those whose executor can rebuild the task
   * (from their last checkpoint), conclude the others with an error saying they were interrupted.
   */
  async recover(): Promise<{ resumed: string[]; failed: string[] }> {
    const resumed: string[] = [];
    const failed: string[] = [];
    // Locks of short operations whose process died hold nothing any more.
    const now = Date.now();
    const ops = await this.store.listOpLocks();
    for (const op of ops) {
      if (!holderAlive(op, this.host, now, (t) => this.lockGone(t))) await this.store.deleteOpLocks(op.id);
    }
    const active = await this.store.listJobs({ active: true });
    for (const rec of active) {
      if (!this.isOrphaned(rec, now) || this.placement(rec) !== undefined) continue;
      const outcome = await this.adopt(rec);
      if (outcome === 'resumed') resumed.push(rec.id);
      else if (outcome === 'failed') failed.push(rec.id);
    }
    // The lock files of runners gone that no active job, operation or export names any more.
    if (this.runnerLocks) {
      const records = [...ops, ...active, ...(await this.store.listExports())];
      const named = new Set(records.map((r) => r.runnerToken));
      const hosts = new Set([this.host, ...records.map((r) => r.runnerHost)]);
      this.runnerLocks.sweep((token) => named.has(token) || liveTokens.has(token), (host) => hosts.has(host));
    }
    return { resumed, failed };
  }

  /**
   * Take an orphaned job over (exactly one runner wins, with the next fencing token), then resume
   * it, or conclude it as interrupted when it cannot be resumed.
   */
  private adopt(rec: JobRecord): Promise<'resumed' | 'failed' | 'concluded' | 'lost'> {
    // One takeover per job at a time in this manager: a second asker waits for the first.
    const pending = this.adopting.get(rec.id) as Promise<'resumed' | 'failed' | 'concluded' | 'lost'> | undefined;
    if (pending) return pending;
    if (this.closing) return Promise.resolve('lost');
    const run = this.adoptNow(rec);
    this.adopting.set(rec.id, run);
    return run.finally(() => this.adopting.delete(rec.id));
  }

  private async adoptNow(rec: JobRecord): Promise<'resumed' | 'failed' | 'concluded' | 'lost'> {
    const stoppedPid = rec.runnerPid;
    const stoppedHost = rec.runnerHost;
    const stoppedToken = rec.runnerToken;
    const until = Date.now() + this.leaseMs;
    this.holdLock();
    const fence = await this.store.claimJob(rec.id, { token: rec.runnerToken, fence: rec.fence, leaseExpires: rec.leaseExpires }, this.me, until);
    if (fence === undefined) return 'lost';
    // Go on from the record as it is now (what the stopped runner saved last), ours since the claim.
    const now = await this.store.getJob(rec.id);
    if (!now) return 'lost';
    rec = now;
    this.onEvent?.({ type: 'takeover', job: rec.id, fence });
    this.logger.info('job taken over', { job: rec.id, fence, from: stoppedPid > 0 ? `${stoppedHost} pid ${stoppedPid}` : 'released' });
    let task: JobTask | undefined;
    let why = 'its executor cannot resume it';
    let succeeded = false;
    if (!rec.cancelled) {
      try {
        const gone = stoppedPid > 0 && (runnerGone({ runnerPid: stoppedPid, runnerHost: stoppedHost }, this.host) || this.lockGone(stoppedToken));
        const resolved = await this.resolveTask(rec, { host: stoppedHost, pid: stoppedPid, gone });
        if (resolved && 'why' in resolved) {
          ({ why, succeeded = false } = resolved);
          if ('checkpoint' in resolved) rec.checkpoint = resolved.checkpoint;
        } else task = resolved;
      } catch (e) {
        why = `resuming failed: ${toOffloadError(e).message}`;
      }
    } else {
      why = 'it had been cancelled';
    }
    if (task) {
      if (await this.resume(rec, task)) return 'resumed';
      task.dropped?.();
      why = 'the volumes it works on are locked by another job';
    }
    rec.status = 'concluded';
    const stopped = `the process running it${stoppedPid > 0 ? ` (pid ${stoppedPid})` : ''} stopped`;
    if (succeeded) {
      delete rec.error;
      rec.updatedAt = new Date().toISOString();
      if (!(await this.store.updateJob(rec))) return 'lost';
      this.logger.info(`job ${rec.id} concluded after a restart: ${stopped}, and ${why}`, { job: rec.id, type: rec.type, ref: rec.ref });
      return 'concluded';
    }
    rec.error = {
      code: rec.cancelled ? 'Cancelled' : 'Internal',
      message: `job ${rec.id} (${rec.type} ${rec.ref}) was interrupted: ${stopped}, and ${why}; run it again`,
    };
    rec.updatedAt = new Date().toISOString();
    if (!(await this.store.updateJob(rec))) return 'lost';
    this.logger.warn('job interrupted', { job: rec.id, type: rec.type, ref: rec.ref });
    return 'failed';
  }

  private async resume(rec: JobRecord, task: JobTask): Promise<boolean> {
    let job: ManagedJob | undefined;
    let lease;
    try {
      // A job reading a snapshot of a disk in use (here or elsewhere) works within what it is in use through, as when it started.
      const reads = snapshotsRead(rec.locks);
      const within = reads.length > 0 ? diskUsers(await this.locks.listOn([...new Set([...rec.locks.map((l) => l.key), ...reads])]), reads, rec.locks) : [];
      lease = await this.locks.acquire(rec.locks, {
        id: rec.id,
        principal: { id: rec.owner, role: rec.ownerRole },
        description: `${rec.type} ${rec.ref}`,
        preempt: () => void job?.cancel().catch(() => undefined),
        ...(within.length > 0 ? { within } : {}),
      });
    } catch {
      return false;
    }
    // Restart the life cycle from `created`, keeping progress and the checkpoint.
    rec.status = 'created';
    rec.updatedAt = new Date().toISOString();
    if (!(await this.store.updateJob(rec).catch(() => false))) {
      lease.release();
      return false;
    }
    const theLease = lease;
    job = new ManagedJob(rec, task, this.store, (j) => {
      theLease.release();
      this.running.delete(j.id);
    }, { ...this.runOptions(), resumeFrom: rec.checkpoint });
    this.running.set(rec.id, job);
    this.logger.info('job resumed', { job: rec.id, type: rec.type, ref: rec.ref });
    job.start();
    return true;
  }

  private runOptions(): ConstructorParameters<typeof ManagedJob>[4] {
    const hook = this.onEvent;
    return {
      leaseMs: this.leaseMs,
      ...(hook ? {
        onFenced: (job: string, why: string) => hook({ type: 'fenced', job, why }),
        onProcessed: (rec: JobRecord, bytes: number) => hook({ type: 'processed', job: rec.id, executor: rec.executor, bytes }),
      } : {}),
      ...(this.checkpointEveryMs === undefined ? {} : { checkpointEveryMs: this.checkpointEveryMs }),
      ...(this.beforeDismiss ? { beforeDismiss: this.beforeDismiss } : {}),
    };
  }

  /** Stop running jobs without concluding them; a later broker start resumes or fails them. */
  async close(): Promise<void> {
    this.closing = true;
    if (this.adopter) clearInterval(this.adopter);
    if (this.sweeper) clearInterval(this.sweeper);
    await this.sweeping;
    await Promise.allSettled([...this.adopting.values()]);
    const jobs = [...this.running.values()];
    for (const j of jobs) j.shutdown();
    // Leases renewed until the jobs have stopped and been released: one that takes longer than a
    // lease to stop (a live copy suspending, a last flush) is not taken over while it still writes.
    await Promise.allSettled(jobs.map((j) => j.wait()));
    clearInterval(this.heartbeat);
    await this.claims.clear();
    await this.rows.close();
    liveTokens.delete(this.token);
    this.runnerLocks?.release(this.token, this.host);
  }
}

/** Who runs (or ran) a job or holds an operation, for messages: `pid 42` here, `pid 42 on HOST` elsewhere. */
function runnerText(r: { runnerPid: number; runnerHost: string }, host: string): string {
  return r.runnerHost && r.runnerHost !== host ? `pid ${r.runnerPid} on ${r.runnerHost}` : `pid ${r.runnerPid}`;
}

/** "12 s ago" from a time in ms (0: never). */
function ago(ms: number): string {
  if (ms <= 0) return 'never';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 120 ? `${s} s ago` : `${Math.round(s / 60)} min ago`;
}
