/**
 * What a backend (or the host data mover) hands the broker for a long operation. The broker's
 * job manager wraps it in a Job: it persists the task's params and checkpoints, drives the
 * life cycle, and gives the task a JobContext to report progress and honour pause, cancel and
 * the speed limit.
 */
export interface JobTask {
  /** Job type: `stream`, `commit`, `copy`, … */
  readonly type: string;
  /** JSON-serialisable parameters, stored so that a restarted broker can rebuild the task. */
  readonly params: Record<string, unknown>;
  /** Run to the end; throw to fail (a Cancelled error after `ctx.signal` aborted means cancelled). */
  run(ctx: JobContext): Promise<void>;
  /** A task rebuilt for a resume that will not run after all (its locks were held): undo what building it set up. */
  dropped?(): void;
}

export interface JobContext {
  readonly jobId: string;
  /** Aborted when the job is cancelled; pass it to I/O that accepts a signal. */
  readonly signal: AbortSignal;
  /** The last checkpoint saved by a previous run of this job, when it is being resumed. */
  readonly resumeFrom: unknown;
  /**
   * The speed limit now, in bytes/s (0 = unlimited; a user may change it while the job runs). A
   * task that moves data in large steps keeps each step near a second's worth, so the limit and
   * the checkpoints stay smooth.
   */
  readonly speed: number;
  /** Total work in bytes (may change while running). */
  setTotal(bytes: number): void;
  /** Add done bytes to the progress. */
  advance(bytes: number): void;
  /** Set absolute progress (e.g. from an appliance's own job). */
  setProgress(current: number, total?: number): void;
  /**
   * Call after each chunk: waits while the job is paused, sleeps as the speed limit requires for
   * the bytes just moved, and throws Cancelled when the job has been cancelled. `state` is what a
   * resumed run needs to continue after this chunk; it is saved at most once a second (and when
   * the job is stopped for a later resume), after the beforeSave hooks have run.
   */
  checkpoint(bytesMoved: number, state?: unknown): Promise<void>;
  /**
   * What checkpoint() does for `bytes` about to move — the pause, the speed limit, a cancel — but
   * without counting them as progress: for a task that reports its progress itself (setProgress),
   * as a live copy does, whose copies may be made again. Absent: use checkpoint().
   */
  pace?(bytes: number): Promise<void>;
  /**
   * Persist resumable state now (e.g. the id of an appliance's job, the moment it exists); await
   * it where what comes next must not happen unrecorded: it rejects when the state was not saved
   * (the store failed, or this runner no longer holds the job).
   */
  saveState(state: unknown): void | Promise<void>;
  /**
   * What must be durable before a saved state may claim the work it describes (e.g. writing the
   * deferred metadata of the image being written, or a record kept beside a raw target): run with
   * the state before every save. Returns the undo, for when that image is closed.
   */
  beforeSave(fn: (state: unknown) => Promise<void>): () => void;
  /** Mirror-like jobs: report `ready` (source and target in sync). */
  ready(): void;
  /** Resolves when a user completes a ready job; rejects with Cancelled when it is cancelled. */
  waitForComplete(): Promise<void>;
  /** True once a user asked a ready job to complete. */
  readonly completeRequested: boolean;
  /**
   * Before a side effect outside the job's own data (starting an appliance's job, switching a
   * chain over), make sure this run still holds the job: the runner's lease is renewed through
   * the store under the job's fencing token. Throws (and stops the run) when another runner has
   * taken the job over or the lease ran out. A run with no lease (a test, `img` commands) passes.
   */
  confirmLease(): Promise<void>;
  /**
   * Right before each write of the job's data that follows an await (a read, a wait): throw
   * LeaseLost, stopping the run, when this runner no longer holds the job by its own clock — no
   * store call, cheap enough for every write. A process the system paused between a read and its
   * write (SIGSTOP, a frozen VM, a long GC) wakes up past its lease, when another runner may be
   * writing the same data from the job's last checkpoint. A run with no lease passes.
   */
  checkLease(): void;
  /**
   * The time (ms since the epoch, this host's clock) up to which this runner holds the job, as one
   * element, moved on in place as the lease is renewed and set to 0 when it is lost: for writes
   * that run outside JavaScript, which cannot ask checkLease (a native copy reads it before each
   * piece it writes; BlockDevice.copyFrom's `until`). Undefined for a run with no lease.
   */
  readonly leaseUntil: Float64Array | undefined;
}
