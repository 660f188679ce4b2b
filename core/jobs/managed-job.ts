import { Cancelled, FailedPrecondition, InvalidArgument, toOffloadError, type OffloadError } from '../model/errors.js';
import { canTransition, assertVerb } from './job-states.js';
import type { Job, JobEvent, JobInfo, JobStatus } from './job.js';
import { JobRun, LeaseLost, Shutdown } from './job-run.js';
import type { JobTask } from './job-task.js';
import type { JobRecord, StoredRequest } from '../state/records.js';
import type { StateStore } from '../state/state-store.js';
import { recordToInfo } from './remote-job.js';

const PERSIST_EVERY_MS = 250;
/**
 * Progress events at most this often, the latest always delivered: each carries a copy of the
 * record, and a job that reports every chunk (a live copy's every 256 KiB) spent ~40 ms of the
 * serving thread per 570 MiB on them (bench/live.ts, CPU profile).
 */
const PROGRESS_EVENT_EVERY_MS = 100;

/**
 * A job run by this process: drives a JobTask through QEMU's life cycle, persists every status
 * change (and progress at most every 250 ms), applies verbs asked from other processes, and
 * releases its locks when it concludes.
 *
 * The in-memory record is the truth while this runner holds the job; its writes to the store go
 * one at a time, in order (`writes`), each writing the record as it is then, fenced: a refused
 * write means another runner has the job, and this one stops writing at once. wait() resolves
 * only once the concluded record is stored.
 */
export class ManagedJob implements Job {
  private readonly listeners = new Set<(e: JobEvent) => void>();
  private readonly run: JobRun;
  private readonly concluded: Promise<JobInfo>;
  private resolveConcluded!: (info: JobInfo) => void;
  private rejectConcluded!: (e: unknown) => void;
  private lastPersist = 0;
  private shuttingDown = false;
  /** Set once the run ended for a shutdown and the job is being released: no more renewals. */
  private releasing = false;
  /** Set once this runner learns it no longer holds the job: from then on it writes nothing. */
  private lost: string | undefined;
  /** JobContext.leaseUntil: the lease's end as this runner knows it, 0 once lost. */
  private readonly leaseUntil = new Float64Array(1);
  private poller?: NodeJS.Timeout;
  private polling = false;
  /** The store writes of this job, in order. */
  private writes: Promise<void> = Promise.resolve();
  /** A record write is queued and has not started: a later persist is covered by it. */
  private recordQueued = false;
  private lastProgressEvent = 0;
  /** A progress event held back (see PROGRESS_EVENT_EVERY_MS), sent when it is due. */
  private progressTimer: NodeJS.Timeout | undefined;

  constructor(
    private readonly record: JobRecord,
    private readonly task: JobTask,
    private readonly store: StateStore,
    private readonly onEnd: (job: ManagedJob) => void,
    private readonly opts: {
      resumeFrom?: unknown; checkpointEveryMs?: number; leaseMs?: number; onFenced?: (job: string, why: string) => void;
      /** Bytes this runner moved on since the last call (progress going forward here; never back). */
      onProcessed?: (job: JobRecord, bytes: number) => void;
      /** Run before the record is deleted (JobManagerOptions.beforeDismiss). */
      beforeDismiss?: (job: JobRecord) => Promise<void>;
    } = {},
  ) {
    const rec = record;
    this.leaseUntil[0] = rec.leaseExpires;
    this.run = new JobRun({
      jobId: rec.id,
      leaseUntil: this.leaseUntil,
      resumeFrom: opts.resumeFrom,
      progress: rec.progress,
      speed: rec.speed,
      ...(opts.checkpointEveryMs !== undefined ? { checkpointEveryMs: opts.checkpointEveryMs } : {}),
      onProgress: (current, total) => {
        this.processed(current);
        rec.progress = { current, total };
        void this.persist(false);
        this.progressEvent();
      },
      // A checkpoint is stored before the job goes on (a resume must never start past stored work).
      onSave: (state, strict) => {
        rec.checkpoint = state;
        return strict ? this.persistNow() : this.persist(true);
      },
      onReady: () => {
        if (rec.status === 'running') {
          this.transition('ready');
          this.emit({ type: 'ready', job: this.info() });
        }
      },
      // Past the lease's end another runner may own the job: act no more (see renewLease).
      mayContinue: () => this.lost === undefined && Date.now() < rec.leaseExpires,
      confirmLease: async () => {
        if (opts.leaseMs !== undefined) await this.renewLease(Date.now() + opts.leaseMs);
        if (this.lost !== undefined || Date.now() >= rec.leaseExpires) {
          throw new LeaseLost(`job ${this.id}: ${this.lost ?? 'this runner\'s lease on it ended'}`);
        }
      },
    });
    this.concluded = new Promise((resolve, reject) => {
      this.resolveConcluded = resolve;
      this.rejectConcluded = reject;
    });
    this.concluded.catch(() => undefined); // a closed broker's job need not be awaited
  }

  get id(): string {
    return this.record.id;
  }

  info(): JobInfo {
    return structuredClone(recordToInfo(this.record));
  }

  /** Start (or resume after a restart) the task. */
  start(): void {
    this.poller = setInterval(() => void this.pollRequests(), 200);
    this.poller.unref();
    this.transition('running');
    void this.execute();
  }

  async pause(): Promise<void> {
    this.pauseNow();
  }

  private pauseNow(): void {
    assertVerb('pause', this.record.status, this.id);
    if (this.record.status === 'paused' || this.record.status === 'standby') {
      throw new FailedPrecondition(`job ${this.id} is already paused`, { ref: this.id });
    }
    if (this.record.status === 'running' || this.record.status === 'created') this.transition('paused');
    else if (this.record.status === 'ready') this.transition('standby');
    this.run.pause();
  }

  async resume(): Promise<void> {
    this.resumeNow();
  }

  private resumeNow(): void {
    assertVerb('resume', this.record.status, this.id);
    if (this.record.status === 'paused') this.transition('running');
    else if (this.record.status === 'standby') this.transition('ready');
    else throw new FailedPrecondition(`job ${this.id} is not paused`, { ref: this.id });
    this.run.resume();
  }

  async cancel(): Promise<void> {
    this.cancelNow();
  }

  private cancelNow(): void {
    assertVerb('cancel', this.record.status, this.id);
    if (this.record.cancelled) return;
    this.record.cancelled = true;
    void this.persist(true);
    // Cancelling a paused job resumes it so that it can see the cancel.
    if (this.record.status === 'paused') this.transition('running');
    if (this.record.status === 'standby') this.transition('ready');
    this.run.cancel(new Cancelled(`job ${this.id} was cancelled`, { ref: this.record.ref }));
  }

  async complete(): Promise<void> {
    assertVerb('complete', this.record.status, this.id);
    this.run.complete();
  }

  async setSpeed(bytesPerSecond: number): Promise<void> {
    this.setSpeedNow(bytesPerSecond);
  }

  private setSpeedNow(bytesPerSecond: number): void {
    assertVerb('set-speed', this.record.status, this.id);
    if (!Number.isFinite(bytesPerSecond) || bytesPerSecond < 0) {
      throw new InvalidArgument(`speed must be a number of bytes per second ≥ 0 (0 = unlimited), got ${bytesPerSecond}`);
    }
    this.record.speed = Math.floor(bytesPerSecond);
    this.run.setSpeed(this.record.speed);
    void this.persist(true);
  }

  async dismiss(): Promise<void> {
    assertVerb('dismiss', this.record.status, this.id);
    await this.writes;
    await this.opts.beforeDismiss?.(this.record);
    await this.store.deleteJob(this.id);
  }

  wait(): Promise<JobInfo> {
    return this.concluded;
  }

  async result(): Promise<JobInfo> {
    const info = await this.concluded;
    if (info.error) {
      const { errorFromCode } = await import('../model/errors.js');
      throw errorFromCode(info.error.code, info.error.message, { ref: info.ref });
    }
    return info;
  }

  on(listener: (event: JobEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /**
   * Extend this runner's lease to `until`; when the store refuses (another runner took the job
   * over, or it was deleted), stop at once without writing anything more.
   */
  renewLease(until: number): Promise<void> {
    return this.enqueue(async () => {
      // Released (or about to be): the release says who holds the job, a renewal after it would be refused.
      if (this.releasing) return true;
      const held = await this.store.renewLease(this.id, this.record.runnerToken, this.record.fence, until);
      if (held) {
        this.record.leaseExpires = Math.max(this.record.leaseExpires, until);
        if (this.lost === undefined) this.leaseUntil[0] = this.record.leaseExpires;
      }
      return held;
    }, 'another runner took it over (or it was deleted)');
  }

  /** Stop running without concluding: the broker is closing; a later start resumes the job. */
  shutdown(): void {
    this.shuttingDown = true;
    this.run.stop(new Shutdown('broker closing'));
  }

  private async execute(): Promise<void> {
    let failure: OffloadError | undefined;
    try {
      await this.task.run(this.run);
    } catch (e) {
      if (e instanceof LeaseLost) this.loseLease(e.message);
      // A task that says how its cancel ended (a live copy suspended for its service's restart, a
      // backup volume its undo could not remove) is heard.
      const said = e instanceof Cancelled ? (e.data as { suspended?: unknown; leftover?: unknown } | undefined) : undefined;
      const told = said?.suspended === true || said?.leftover === true ? e as Cancelled : undefined;
      failure = this.record.cancelled ? told ?? new Cancelled(`job ${this.id} was cancelled`, { ref: this.record.ref }) : toOffloadError(e, `${this.record.type} ${this.record.ref}`);
    }
    if (this.lost !== undefined) return this.giveUp();
    try {
      if (this.shuttingDown) return await this.abandon();
      // A job paused between chunks may still end (its chunk failed or was its last): leave the
      // pause first, as QEMU allows no paused → aborting/waiting transition.
      if (this.record.status === 'paused') this.transition('running');
      if (this.record.status === 'standby') this.transition('ready');
      if (failure) {
        this.transition('aborting');
        this.record.error = { code: failure.code, message: failure.message };
        this.transition('concluded');
        this.emit({ type: this.record.cancelled ? 'cancelled' : 'error', job: this.info() });
      } else {
        this.processed(this.record.progress.total);
        this.record.progress.current = Math.max(this.record.progress.current, this.record.progress.total);
        this.transition('waiting');
        this.transition('pending');
        this.transition('concluded');
        this.emit({ type: 'completed', job: this.info() });
      }
    } catch (e) {
      // Never leave a job hanging (or an unhandled rejection): record what went wrong.
      this.record.status = 'concluded';
      this.record.error ??= { code: 'Internal', message: `job ${this.id}: ${(e as Error).message}` };
      void this.persist(true);
    }
    // The outcome is stored before anyone learns of it (a CLI that exits after wait() leaves it recorded).
    await this.writes;
    if (this.lost !== undefined) return this.giveUp();
    this.end();
    this.resolveConcluded(this.info());
  }

  /**
   * The broker closed while the job ran: its record stays active, released by this runner (so
   * another may take it over at once), and wait() rejects.
   */
  private async abandon(): Promise<void> {
    this.releasing = true;
    await this.writes;
    if (this.lost !== undefined) return this.giveUp();
    try {
      if (!(await this.store.releaseJob(this.id, this.record.runnerToken, this.record.fence, this.record.checkpoint))) {
        this.lost = 'another runner took it over (or it was deleted)';
        return this.giveUp();
      }
    } catch {
      // closing store: the lease runs out by itself
    }
    this.end();
    this.rejectConcluded(new FailedPrecondition(`job ${this.id} stopped because its broker closed before it concluded; take it over with \`offload jobs resume ${this.id}\``, { ref: this.record.ref }));
  }

  /** This runner no longer holds the job (LeaseLost, a refused write): stop, writing nothing more. */
  private loseLease(why: string): void {
    if (this.lost !== undefined) return;
    this.lost = why;
    this.leaseUntil[0] = 0; // a native copy under way writes no more
    this.opts.onFenced?.(this.id, why);
    this.run.stop(new LeaseLost(`job ${this.id}: ${why}`));
  }

  /** End after losing the job: nothing is written; wait() rejects saying so. */
  private giveUp(): void {
    this.end();
    this.rejectConcluded(new FailedPrecondition(`job ${this.id} stopped in this process: ${this.lost ?? 'its lease ended'}`, {
      ref: this.record.ref, hint: `see who runs it now with \`offload jobs show ${this.id}\``,
    }));
  }

  private end(): void {
    if (this.poller) clearInterval(this.poller);
    this.onEnd(this);
  }

  private transition(to: JobStatus): void {
    const from = this.record.status;
    if (from === to && to !== 'aborting') return;
    if (from !== to && !canTransition(from, to)) throw new Error(`job ${this.id}: illegal transition ${from} → ${to}`);
    this.record.status = to;
    void this.persist(true);
    this.emit({ type: 'status', job: this.info() });
  }

  /**
   * Write the record (as it is when the write runs); fenced: a refused write means another runner
   * has the job, and this one stops. Resolves once written (or skipped).
   */
  private persist(force: boolean): Promise<void> {
    if (this.lost !== undefined) return this.writes;
    const now = Date.now();
    if (!force && now - this.lastPersist < PERSIST_EVERY_MS) return this.writes;
    this.lastPersist = now;
    if (this.recordQueued) return this.writes; // the queued write will carry this change too
    this.recordQueued = true;
    return this.enqueue(() => {
      this.recordQueued = false;
      this.record.updatedAt = new Date().toISOString();
      return this.store.updateJob(structuredClone(this.record));
    }, 'its record was taken over by another runner (or deleted)');
  }

  /**
   * The record written now, after the writes before it (JobContext.saveState): rejects when it was
   * not — the store failed, or another runner holds the job — where persist() would skip it.
   */
  private persistNow(): Promise<void> {
    const refused = 'its record was taken over by another runner (or deleted)';
    if (this.lost !== undefined) return Promise.reject(new LeaseLost(`job ${this.id}: ${this.lost}; its state was not saved`));
    this.lastPersist = Date.now();
    let failure: unknown;
    const done = this.enqueue(async () => {
      this.record.updatedAt = new Date().toISOString();
      try {
        return await this.store.updateJob(structuredClone(this.record));
      } catch (e) {
        failure = e;
        throw e;
      }
    }, refused);
    return done.then(() => {
      if (failure !== undefined) throw failure;
      if (this.lost !== undefined) throw new LeaseLost(`job ${this.id}: ${this.lost}; its state was not saved`);
    });
  }

  /**
   * Run a fenced store write after the ones before it. A write that fails (the store is closing,
   * or unreachable) is skipped: the lease, no longer renewed, ends the job's run in time.
   */
  private enqueue(write: () => Promise<boolean>, refused: string): Promise<void> {
    this.writes = this.writes.then(async () => {
      if (this.lost !== undefined) return;
      let ok: boolean;
      try {
        ok = await write();
      } catch {
        return;
      }
      if (!ok) this.loseLease(refused);
    });
    return this.writes;
  }

  private async pollRequests(): Promise<void> {
    // A runner past its lease (woken from a stop) takes no request: it may be the new runner's.
    if (this.polling || this.lost !== undefined || Date.now() >= this.record.leaseExpires) return;
    this.polling = true;
    let req: StoredRequest | undefined;
    try {
      req = await this.store.takeRequest(this.id);
    } catch {
      return; // the store is closing
    } finally {
      this.polling = false;
    }
    if (!req) return;
    try {
      switch (req.verb) {
        case 'cancel': this.cancelNow(); break;
        case 'pause': this.pauseNow(); break;
        case 'resume': this.resumeNow(); break;
        case 'complete': this.run.complete(); break;
        case 'set-speed': this.setSpeedNow(req.speed); break;
      }
    } catch {
      // A verb that no longer applies (the job moved on) is dropped, as QEMU would refuse it.
    }
  }

  /** Progress reaching `current`: what it moved forward, for the bytes counters (a step back, as a resume from a checkpoint, counts nothing). */
  private processed(current: number): void {
    const moved = current - this.record.progress.current;
    if (moved > 0) this.opts.onProcessed?.(this.record, moved);
  }

  /** A progress event now, or when the last one is PROGRESS_EVENT_EVERY_MS old (then with the progress as it is). */
  private progressEvent(): void {
    if (this.listeners.size === 0 || this.progressTimer !== undefined) return;
    const wait = this.lastProgressEvent + PROGRESS_EVENT_EVERY_MS - Date.now();
    if (wait > 0) {
      this.progressTimer = setTimeout(() => {
        this.progressTimer = undefined;
        // A status event since carried the progress; after the conclusion there is none to give.
        if (this.record.status !== 'concluded') this.progressEvent();
      }, wait);
      this.progressTimer.unref();
      return;
    }
    this.lastProgressEvent = Date.now();
    this.emit({ type: 'progress', job: this.info() });
  }

  private emit(e: JobEvent): void {
    // A runner that lost the job tells nobody it progressed or concluded: the new runner will.
    if (this.lost !== undefined) return;
    for (const l of this.listeners) {
      try {
        l(e);
      } catch {
        // A listener's failure must not break the job.
      }
    }
  }
}
