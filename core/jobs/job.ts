import type { ErrorCode } from '../model/errors.js';

/** QEMU's JobStatus (qapi/job.json), without `undefined` and `null`. */
export type JobStatus =
  | 'created' | 'running' | 'paused' | 'ready' | 'standby'
  | 'waiting' | 'pending' | 'aborting' | 'concluded';

export type JobVerb = 'cancel' | 'pause' | 'resume' | 'set-speed' | 'complete' | 'finalize' | 'dismiss';

export interface JobProgress {
  /** Bytes done; never decreases. */
  current: number;
  /** Bytes in all (may move either way while running). */
  total: number;
}

export interface JobInfo {
  id: string;
  type: string;
  status: JobStatus;
  /** Where it runs: `backend:NAME` or `host`. */
  executor: string;
  /** The ref the job works on (its target). */
  ref: string;
  /** The principal that started it. */
  owner: string;
  progress: JobProgress;
  /** Speed limit in bytes/s; 0 = unlimited. */
  speed: number;
  /** Set when concluded with an error (absent in `concluded` = success). */
  error?: { code: ErrorCode; message: string };
  /** True once the job has been cancelled by a user. */
  cancelled: boolean;
  createdAt: string;
  updatedAt: string;
  /** The process that runs it (or ran it last): its host, pid, and when its lease was last renewed. */
  runner?: { host: string; pid: number; seenAt: string };
  /**
   * The job is not concluded but nobody runs it: its runner stopped (its lease expired, or it
   * died on this host, or it gave the job up). `offload jobs resume ID` (broker.jobs.takeOver)
   * or a running service takes it over; listing or showing it never does.
   */
  orphaned?: boolean;
  /**
   * A live job's switch-over record (its saved `authoritative`): which volume holds the data —
   * the source until the switch-over is recorded, the target from then on.
   */
  authoritative?: { side: 'source' | 'target'; ref: string; refs?: string[] };
  /**
   * A live copy cancelled after ready: per pair, the snapshot of the source that its target
   * equals (null where none could be taken); `copy --live SRC DST --since NAME` resumes from it.
   */
  resumeSince?: (string | null)[];
  /** A live copy suspended when its service stopped: the service resumes it (as a new job) when it starts again. */
  suspended?: boolean;
  /**
   * A live copy whose service died while it copied: its write-intent record says where its
   * targets may differ, and the service resumes it from there (as a new job) when it serves the
   * sources again. Taken away once anything else exports a source or target read-write.
   */
  crashed?: boolean;
  /** A live copy resumed (from its points or its write-intent record) as this job. */
  resumedBy?: string;
  /** The plan the job was started from, as `plan()` explained it. */
  plan?: unknown;
  params: Record<string, unknown>;
}

export type JobEvent =
  | { type: 'status'; job: JobInfo }
  | { type: 'progress'; job: JobInfo }
  | { type: 'ready'; job: JobInfo }
  | { type: 'completed'; job: JobInfo }
  | { type: 'cancelled'; job: JobInfo }
  | { type: 'error'; job: JobInfo };

/** A running or finished job, as the broker hands it out. */
export interface Job {
  readonly id: string;
  /** The job as last known: live for a job this process runs, as last read for one another runs. */
  info(): JobInfo;
  pause(): Promise<void>;
  resume(): Promise<void>;
  cancel(): Promise<void>;
  /** For jobs that reached `ready` (active commit, live copy): switch over and finish. */
  complete(): Promise<void>;
  setSpeed(bytesPerSecond: number): Promise<void>;
  /** Forget a concluded job. */
  dismiss(): Promise<void>;
  /** Resolves with the final info once concluded (success or not; check `error`). */
  wait(): Promise<JobInfo>;
  /** Like wait(), but rejects with the job's typed error when it failed or was cancelled. */
  result(): Promise<JobInfo>;
  on(listener: (event: JobEvent) => void): () => void;
}
