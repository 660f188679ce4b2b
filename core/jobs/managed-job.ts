import { Cancelled, FailedPrecondition, InvalidArgument, toOffloadError, type OffloadError } from '../model/errors.js';
import { canTransition, assertVerb } from './job-states.js';
import type { Job, JobEvent, JobInfo, JobStatus } from './job.js';
import { JobRun, LeaseLost, Shutdown } from './job-run.js';
import type { JobTask } from './job-task.js';
import type { JobRecord, JobStore, StoredRequest } from './job-store.js';
import { recordToInfo } from './remote-job.js';

const PERSIST_EVERY_MS = 250;

/**
 * A job run by this process: drives a JobTask through QEMU's life cycle, persists every status
 * change (and progress at most every 250 ms), applies verbs asked from other processes, and
 * releases its locks when it concludes.
 */
export class ManagedJob implements Job {
  private readonly listeners = new Set<(e: JobEvent) => void>();
  private readonly run: JobRun;
  private readonly concluded: Promise<JobInfo>;
  private resolveConcluded!: (info: JobInfo) => void;
  private rejectConcluded!: (e: unknown) => void;
  private lastPersist = 0;
  private shuttingDown = false;
  /** Set once this runner learns it no longer holds the job: from then on it writes nothing. */
  private lost: string | undefined;
  private poller?: NodeJS.Timeout;

  constructor(
    private readonly record: JobRecord,
    private readonly task: JobTask,
    private readonly store: JobStore,
    private readonly onEnd: (job: ManagedJob) => void,
    opts: { resumeFrom?: unknown; checkpointEveryMs?: number; leaseMs?: number } = {},
  ) {
    const rec = record;
    this.run = new JobRun({
      jobId: rec.id,
      resumeFrom: opts.resumeFrom,
      progress: rec.progress,
      speed: rec.speed,
      ...(opts.checkpointEveryMs !== undefined ? { checkpointEveryMs: opts.checkpointEveryMs } : {}),
      onProgress: (current, total) => {
        rec.progress = { current, total };
        this.persist(false);
        this.emit({ type: 'progress', job: this.info() });
      },
      onSave: (state) => {
        rec.checkpoint = state;
        this.persist(true);
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
        if (opts.leaseMs !== undefined) this.renewLease(Date.now() + opts.leaseMs);
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
    this.poller = setInterval(() => this.pollRequests(), 200);
    this.poller.unref();
    this.transition('running');
    void this.execute();
  }

  pause(): void {
    assertVerb('pause', this.record.status, this.id);
    if (this.record.status === 'paused' || this.record.status === 'standby') {
      throw new FailedPrecondition(`job ${this.id} is already paused`, { ref: this.id });
    }
    if (this.record.status === 'running' || this.record.status === 'created') this.transition('paused');
    else if (this.record.status === 'ready') this.transition('standby');
    this.run.pause();
  }

  resume(): void {
    assertVerb('resume', this.record.status, this.id);
    if (this.record.status === 'paused') this.transition('running');
    else if (this.record.status === 'standby') this.transition('ready');
    else throw new FailedPrecondition(`job ${this.id} is not paused`, { ref: this.id });
    this.run.resume();
  }

  cancel(): void {
    assertVerb('cancel', this.record.status, this.id);
    if (this.record.cancelled) return;
    this.record.cancelled = true;
    this.persist(true);
    // Cancelling a paused job resumes it so that it can see the cancel.
    if (this.record.status === 'paused') this.transition('running');
    if (this.record.status === 'standby') this.transition('ready');
    this.run.cancel(new Cancelled(`job ${this.id} was cancelled`, { ref: this.record.ref }));
  }

  complete(): void {
    assertVerb('complete', this.record.status, this.id);
    this.run.complete();
  }

  setSpeed(bytesPerSecond: number): void {
    assertVerb('set-speed', this.record.status, this.id);
    if (!Number.isFinite(bytesPerSecond) || bytesPerSecond < 0) {
      throw new InvalidArgument(`speed must be a number of bytes per second ≥ 0 (0 = unlimited), got ${bytesPerSecond}`);
    }
    this.record.speed = Math.floor(bytesPerSecond);
    this.run.setSpeed(this.record.speed);
    this.persist(true);
  }

  dismiss(): void {
    assertVerb('dismiss', this.record.status, this.id);
    this.store.delete(this.id);
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
  renewLease(until: number): void {
    if (this.lost !== undefined) return;
    let held: boolean;
    try {
      held = this.store.renew(this.id, this.record.runnerToken, this.record.fence, until);
    } catch {
      return; // the store is closing; the lease runs out by itself
    }
    if (held) this.record.leaseExpires = until;
    else this.loseLease('another runner took it over (or it was deleted)');
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
      failure = this.record.cancelled ? new Cancelled(`job ${this.id} was cancelled`, { ref: this.record.ref }) : toOffloadError(e, `${this.record.type} ${this.record.ref}`);
    }
    if (this.lost !== undefined) return this.giveUp();
    try {
      if (this.shuttingDown) return this.abandon();
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
      try {
        this.persist(true);
      } catch {
        // the store is gone; the next broker start fails the job as interrupted
      }
    }
    if (this.lost !== undefined) return this.giveUp();
    this.end();
    this.resolveConcluded(this.info());
  }

  /**
   * The broker closed while the job ran: its record stays active, released by this runner (so
   * another may take it over at once), and wait() rejects.
   */
  private abandon(): void {
    try {
      if (!this.store.release(this.id, this.record.runnerToken, this.record.fence, this.record.checkpoint)) {
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
    this.persist(true);
    this.emit({ type: 'status', job: this.info() });
  }

  /** Write the record; fenced: a refused write means another runner has the job, and this one stops. */
  private persist(force: boolean): void {
    if (this.lost !== undefined) return;
    const now = Date.now();
    if (!force && now - this.lastPersist < PERSIST_EVERY_MS) return;
    this.lastPersist = now;
    this.record.updatedAt = new Date(now).toISOString();
    if (!this.store.update(this.record)) this.loseLease('its record was taken over by another runner (or deleted)');
  }

  private pollRequests(): void {
    let req: StoredRequest | undefined;
    try {
      req = this.store.takeRequest(this.id);
    } catch {
      return; // the store is closing
    }
    if (!req) return;
    try {
      switch (req.verb) {
        case 'cancel': this.cancel(); break;
        case 'pause': this.pause(); break;
        case 'resume': this.resume(); break;
        case 'complete': this.complete(); break;
        case 'set-speed': this.setSpeed(req.speed); break;
      }
    } catch {
      // A verb that no longer applies (the job moved on) is dropped, as QEMU would refuse it.
    }
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
