/** The mock ONTAP's job clock: queued → running → success (or an injected failure), then expiry. */
import { finishJob, type JobRecord } from './records.js';

export interface JobTiming {
  /** How long an ordinary job takes from queued to success. */
  durationMs: number;
  /** How long a finished job stays visible. */
  expiryMs: number;
}

/**
 * Bring every job to `now`: start queued ones, finish ordinary ones after their duration (or with
 * their injected failure once polled enough), leave stuck ones, forget expired ones; a running
 * clone split advances through `split`. Returns whether anything changed.
 */
export function advanceJobs(jobs: Map<string, JobRecord>, now: number, timing: JobTiming, split: (job: JobRecord) => boolean): boolean {
  let changed = false;
  for (const job of jobs.values()) {
    if (job.state === 'success' || job.state === 'failure') {
      if (job.endedAt !== undefined && now - job.endedAt >= timing.expiryMs) {
        jobs.delete(job.uuid);
        changed = true;
      }
      continue;
    }
    const age = now - job.createdAt;
    if (job.state === 'queued' && age >= timing.durationMs / 4) {
      job.state = 'running';
      job.message = job.kind === 'split' ? job.message : 'Running';
      job.startTime = new Date(now).toISOString();
      changed = true;
    }
    if (job.state !== 'running' || job.stuck) continue;
    if (job.failure) {
      if (job.polls >= (job.failAfterPolls ?? 0) && age >= timing.durationMs) {
        finishJob(job, job.failure);
        changed = true;
      }
      continue;
    }
    if (job.kind === 'split') {
      changed = split(job) || changed;
    } else if (age >= timing.durationMs) {
      finishJob(job);
      changed = true;
    }
  }
  return changed;
}
