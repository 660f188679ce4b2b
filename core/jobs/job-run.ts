import { Cancelled } from '../model/errors.js';
import type { JobContext } from './job-task.js';
import { RateLimiter } from './rate-limiter.js';

export interface JobRunOptions {
  jobId?: string;
  /** The state a previous run saved: the task resumes from it. */
  resumeFrom?: unknown;
  /** Progress already made (a resumed job keeps its numbers). */
  progress?: { current: number; total: number };
  /** Speed limit in bytes/s (0 = unlimited). */
  speed?: number;
  /**
   * Save a checkpoint's state at most this often (default 1000 ms; 0 = every one). Each save costs
   * the task's beforeSave work (writing deferred metadata) and the owner's write; a resumed job
   * redoes at most this much.
   */
  checkpointEveryMs?: number;
  /** Progress changed. */
  onProgress?(current: number, total: number): void;
  /**
   * Persist a state the task can be resumed from (the job store, a file beside a target…).
   * `strict` (JobContext.saveState): reject when it was not persisted; else a failed write may be
   * skipped (a periodic checkpoint: the next one carries the state too).
   */
  onSave?(state: unknown, strict: boolean): void | Promise<void>;
  /** The task reported ready (its source and target are in sync). */
  onReady?(): void;
  /**
   * Whether this run may still act (its runner's lease on the job is current). Asked at every
   * checkpoint, before the task goes on: false stops the run at once with LeaseLost, saving
   * nothing — another runner may own the job by now.
   */
  mayContinue?(): boolean;
  /** JobContext.confirmLease: renew the lease through the store now; throws LeaseLost when refused. */
  confirmLease?(): Promise<void>;
  /** JobContext.leaseUntil: kept current by the owner (renewals, a loss). */
  leaseUntil?: Float64Array;
}

/** Why a run stopped without concluding (its owner is shutting down: the job will be resumed). */
export class Shutdown extends Error {}

/** Why a run stopped at once, saving nothing: its runner no longer holds the job (see mayContinue). */
export class LeaseLost extends Error {}

/**
 * Whether the run behind `ctx` still holds its job (JobContext.checkLease passes): false once its
 * lease ended by its own clock or it learnt another runner took the job over, whatever else ended
 * the run meanwhile (a cancel taken after the lease ran out, a shutdown's last writes).
 */
export function holdsLease(ctx: Pick<JobContext, 'checkLease'>): boolean {
  try {
    ctx.checkLease();
    return true;
  } catch (e) {
    if (e instanceof LeaseLost) return false;
    throw e;
  }
}

/**
 * How a job closes what it wrote (BlockDevice.close, the qcow2 engine's Image.close): as usual
 * while its run holds the lease; else writing nothing more — what it holds back (deferred
 * metadata) is dropped rather than written over what the runner that holds the job now wrote.
 */
export function closeAfter(ctx: Pick<JobContext, 'checkLease'>): { writeNothing?: boolean } {
  return holdsLease(ctx) ? {} : { writeNothing: true };
}

/**
 * Whether a run that ended with `e` leaves the job to a later run — its owner shut down (Shutdown),
 * or another runner holds the job now (LeaseLost, or the run no longer holds its lease) — so that
 * its undo (removing the target it made, reverting a backup, cancelling an appliance's job) must
 * not run: the next run goes on with what is there, and may be writing it already.
 */
export function leftForNextRun(e: unknown, ctx?: Pick<JobContext, 'checkLease'>): boolean {
  return e instanceof Shutdown || e instanceof LeaseLost || (ctx !== undefined && !holdsLease(ctx));
}

/**
 * One run of a JobTask — the only JobContext implementation: progress, the speed limit, pause,
 * cancel and complete, and checkpoints saved at most once per interval after what the task
 * registered with beforeSave is durable. Its owner (the broker's ManagedJob, a CLI command, a
 * short operation that runs a job inline, a test) drives it with pause/resume/cancel/stop/complete
 * and hears back through the options' callbacks.
 */
export class JobRun implements JobContext {
  readonly jobId: string;
  readonly resumeFrom: unknown;
  readonly leaseUntil: Float64Array | undefined;
  private readonly abort = new AbortController();
  private readonly limiter = new RateLimiter();
  private speedLimit: number;
  private readonly checkpointEveryMs: number;
  private readonly saveHooks: ((state: unknown) => Promise<void>)[] = [];
  private doneBytes: number;
  private readonly doneBytesAtStart: number;
  private totalBytes: number;
  private paused = false;
  private resumeWaiters: (() => void)[] = [];
  /**
   * Paced waits in progress, woken by the one abort listener (a mirror's 16 workers each wait for
   * the speed limit: a listener each made Node warn of a leak at the 11th).
   */
  private readonly sleepers = new Set<() => void>();
  private completeAsked = false;
  private completeWaiter: { resolve: () => void; reject: (e: unknown) => void } | undefined;
  private lastSave = -Infinity;
  /** The newest state not saved yet (throttled). */
  private unsaved: { state: unknown } | undefined;

  constructor(private readonly opts: JobRunOptions = {}) {
    this.jobId = opts.jobId ?? 'local';
    this.resumeFrom = opts.resumeFrom;
    this.leaseUntil = opts.leaseUntil;
    this.doneBytes = opts.progress?.current ?? 0;
    this.doneBytesAtStart = this.doneBytes;
    this.totalBytes = opts.progress?.total ?? 0;
    this.checkpointEveryMs = opts.checkpointEveryMs ?? 1000;
    this.speedLimit = Math.max(0, opts.speed ?? 0);
    this.limiter.setSpeed(this.speedLimit);
  }

  // ---- the task's side (JobContext) ----

  get signal(): AbortSignal {
    return this.abort.signal;
  }

  get speed(): number {
    return this.speedLimit;
  }

  setTotal(bytes: number): void {
    this.totalBytes = Math.max(0, bytes);
    this.opts.onProgress?.(this.doneBytes, this.totalBytes);
  }

  advance(bytes: number): void {
    // Never past the total (a resumed run redoes what followed its last saved checkpoint).
    this.doneBytes += Math.max(0, bytes);
    if (this.totalBytes > 0) this.doneBytes = Math.min(this.doneBytes, Math.max(this.totalBytes, this.doneBytesAtStart));
    this.opts.onProgress?.(this.doneBytes, this.totalBytes);
  }

  setProgress(current: number, total?: number): void {
    this.doneBytes = Math.max(this.doneBytes, current);
    if (total !== undefined) this.totalBytes = total;
    this.opts.onProgress?.(this.doneBytes, this.totalBytes);
  }

  pace(bytes: number): Promise<void> {
    return this.step(bytes, undefined, false);
  }

  checkpoint(bytesMoved: number, state?: unknown): Promise<void> {
    return this.step(bytesMoved, state, true);
  }

  private async step(bytesMoved: number, state: unknown, count: boolean): Promise<void> {
    this.endIfLeaseLost();
    if (bytesMoved > 0 && count) this.advance(bytesMoved);
    if (state !== undefined) {
      this.unsaved = { state };
      if (Date.now() - this.lastSave >= this.checkpointEveryMs) await this.saveUnsaved(false);
    }
    await this.throwIfStopped();
    const delay = this.limiter.delayFor(bytesMoved);
    if (delay > 0) await this.sleep(delay);
    while (this.paused) {
      await new Promise<void>((r) => this.resumeWaiters.push(r));
      await this.throwIfStopped();
    }
    this.endIfLeaseLost();
    await this.throwIfStopped();
  }

  checkLease(): void {
    if (this.abort.signal.reason instanceof LeaseLost) throw this.abort.signal.reason;
    // Asked whatever ended the run before (a cancel, a shutdown still writing its last state):
    // the clock says whether this runner may still write.
    if (this.opts.mayContinue && !this.opts.mayContinue()) {
      const lost = new LeaseLost(`job ${this.jobId}: this runner's lease on it ended (another runner may have taken it over)`);
      this.end(lost);
      throw lost;
    }
  }

  /** Stop with LeaseLost when the owner says this run may no longer act. */
  private endIfLeaseLost(): void {
    if (this.opts.mayContinue && !this.abort.signal.aborted && !this.opts.mayContinue()) {
      this.end(new LeaseLost(`job ${this.jobId}: this runner's lease on it ended (another runner may have taken it over)`));
    }
  }

  saveState(state: unknown): Promise<void> {
    this.unsaved = { state };
    return this.saveUnsaved(true);
  }

  beforeSave(fn: (state: unknown) => Promise<void>): () => void {
    this.saveHooks.push(fn);
    return () => {
      const i = this.saveHooks.indexOf(fn);
      if (i >= 0) this.saveHooks.splice(i, 1);
    };
  }

  ready(): void {
    this.opts.onReady?.();
  }

  async confirmLease(): Promise<void> {
    this.endIfLeaseLost();
    await this.throwIfStopped();
    try {
      await this.opts.confirmLease?.();
    } catch (e) {
      this.end(e);
      throw e;
    }
  }

  waitForComplete(): Promise<void> {
    if (this.abort.signal.aborted) return Promise.reject(this.abort.signal.reason);
    if (this.completeAsked) return Promise.resolve();
    return new Promise<void>((resolve, reject) => { this.completeWaiter = { resolve, reject }; });
  }

  get completeRequested(): boolean {
    return this.completeAsked;
  }

  // ---- the owner's side ----

  get progress(): { current: number; total: number } {
    return { current: this.doneBytes, total: this.totalBytes };
  }

  setSpeed(bytesPerSecond: number): void {
    this.speedLimit = Math.max(0, bytesPerSecond);
    this.limiter.setSpeed(this.speedLimit);
  }

  pause(): void {
    this.paused = true;
  }

  resume(): void {
    this.paused = false;
    this.wake();
  }

  /** A user asked a ready job to finish (switch over). */
  complete(): void {
    this.completeAsked = true;
    this.completeWaiter?.resolve();
  }

  /** Stop the task with Cancelled (at its next checkpoint, or at once where it waits). */
  cancel(reason: unknown = new Cancelled(`job ${this.jobId} was cancelled`)): void {
    this.end(reason);
  }

  /** Stop the task for a later resume: the newest checkpoint state is saved first. */
  stop(reason: unknown = new Shutdown('the job\'s owner is shutting down')): void {
    this.end(reason);
  }

  private end(reason: unknown): void {
    if (this.abort.signal.aborted) return;
    this.paused = false;
    this.abort.abort(reason);
    this.wake();
    this.completeWaiter?.reject(reason);
  }

  private async throwIfStopped(): Promise<void> {
    if (!this.abort.signal.aborted) return;
    // Stopped for a resume: what the last checkpoint says is done is kept.
    if (this.abort.signal.reason instanceof Shutdown) await this.saveUnsaved(false).catch(() => undefined);
    throw this.abort.signal.reason;
  }

  /**
   * `strict` (saveState): what the task goes on to do must not happen unrecorded, so a state that
   * is not saved — the lease lost, the store failing — rejects rather than resolving unsaved.
   */
  private async saveUnsaved(strict: boolean): Promise<void> {
    const pending = this.unsaved;
    if (!pending) return;
    const refused = () => new LeaseLost(`job ${this.jobId}: this runner's lease on it ended (another runner may have taken it over); its state was not saved`);
    // Not while another runner may own the job (also after a stop for another reason: the save
    // hooks write data, a qcow2 target's metadata or a raw target's record).
    if (this.opts.mayContinue && !this.opts.mayContinue()) {
      this.endIfLeaseLost();
      if (strict) throw refused();
      return;
    }
    if (this.abort.signal.reason instanceof LeaseLost) {
      if (strict) throw refused();
      return;
    }
    this.unsaved = undefined;
    for (const hook of this.saveHooks) await hook(pending.state);
    await this.opts.onSave?.(pending.state, strict);
    this.lastSave = Date.now();
  }

  private wake(): void {
    const w = this.resumeWaiters;
    this.resumeWaiters = [];
    for (const r of w) r();
  }

  private sleep(ms: number): Promise<void> {
    if (this.abort.signal.aborted) return Promise.resolve();
    if (this.sleepers.size === 0) this.abort.signal.addEventListener('abort', this.wakeSleepers, { once: true });
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(t);
        this.sleepers.delete(done);
        if (this.sleepers.size === 0) this.abort.signal.removeEventListener('abort', this.wakeSleepers);
        resolve();
      };
      const t = setTimeout(done, ms);
      this.sleepers.add(done);
    });
  }

  private readonly wakeSleepers = (): void => {
    for (const s of [...this.sleepers]) s();
  };
}
