/**
 * `chain.stream` on ONTAP: a FlexClone split, offloaded to the appliance. The task starts the
 * split (or finds the one already running after a broker restart), then follows the appliance
 * job, reporting the appliance's own progress; cancelling the broker job cancels the appliance
 * job. There is no poll budget: a split takes as long as the data it copies, and the user can
 * cancel it.
 */
import { Cancelled, isOffloadError, LeaseLost, leftForNextRun, NotFound, type JobContext, type JobTask } from '../../core/index.js';
import { Collection, Job, JobLinkResponse, type Volume } from './api/schemas.js';
import type { OntapClient } from './client.js';
import { mapApiError } from './errors.js';

export interface SplitParams {
  backend: string;
  volume: string;
  svm: string;
}

interface SplitState {
  jobUuid?: string;
}

export interface SplitDeps {
  client: OntapClient;
  pollIntervalMs: number;
  pollMaxIntervalMs: number;
  findVolume(name: string): Promise<Volume | undefined>;
}

/** A clone split as a resumable broker job: the appliance's job uuid is its checkpoint. */
export class SplitTask implements JobTask {
  readonly type = 'stream';
  readonly params: Record<string, unknown>;
  private total = 0;
  private current = 0;

  constructor(
    private readonly p: SplitParams,
    private readonly deps: SplitDeps,
  ) {
    this.params = { ...p };
  }

  private get ref(): string {
    return `${this.p.backend}/${this.p.volume}`;
  }

  async run(ctx: JobContext): Promise<void> {
    const what = `split clone ${this.ref}`;
    let jobUuid = (ctx.resumeFrom as SplitState | undefined)?.jobUuid;
    let volume = await this.deps.findVolume(this.p.volume);
    if (!volume) throw new NotFound(`${what}: volume "${this.p.volume}" does not exist`, { ref: this.ref });
    if (jobUuid === undefined) {
      if (!volume.clone?.is_flexclone) {
        // Already independent (never a clone, or a split that ended while the broker was down).
        ctx.setProgress(0, 0);
        return;
      }
      // Before the split, the appliance's estimate is exactly what it will copy.
      if (!volume.clone.split_initiated && volume.clone.split_estimate !== undefined) {
        this.total = volume.clone.split_estimate;
        ctx.setProgress(0, this.total);
      }
      if (!volume.clone.split_initiated) await ctx.confirmLease(); // a split is started by one runner only
      jobUuid = volume.clone.split_initiated ? await this.findRunningJob(volume.uuid, what) : await this.start(volume.uuid, what);
      if (jobUuid !== undefined) ctx.saveState({ jobUuid } satisfies SplitState);
    }
    let interval = this.deps.pollIntervalMs;
    for (;;) {
      await this.checkpoint(ctx, jobUuid, what);
      let job: Job | undefined;
      if (jobUuid !== undefined) {
        try {
          job = (await this.deps.client.request('GET', `/api/cluster/jobs/${jobUuid}`, { what, ref: this.ref, schema: Job, signal: ctx.signal })).data;
        } catch (e) {
          if (!isOffloadError(e, 'NotFound')) throw await this.cancelled(e, jobUuid, what, ctx);
          jobUuid = undefined; // expired: follow the volume instead
        }
      }
      volume = await this.deps.findVolume(this.p.volume);
      if (!volume) throw new NotFound(`${what}: volume "${this.p.volume}" disappeared during the split`, { ref: this.ref });
      this.report(ctx, volume);
      if (job?.state === 'failure') {
        throw mapApiError({
          what,
          ref: this.ref,
          code: job.error?.code ?? (job.code !== undefined ? String(job.code) : undefined),
          message: job.error?.message ?? job.message ?? 'the split failed',
          jobUuid: job.uuid,
        });
      }
      if (job?.state === 'success' || (!job && !volume.clone?.is_flexclone)) {
        ctx.setProgress(this.total, this.total);
        return;
      }
      if (!job && !volume.clone?.split_initiated) {
        throw new Cancelled(`${what}: the split stopped on the appliance before it finished`, { ref: this.ref, hint: 'run `offload stream` again' });
      }
      await sleepUnlessAborted(interval, ctx.signal);
      interval = Math.min(this.deps.pollMaxIntervalMs, interval * 1.5);
    }
  }

  private async start(uuid: string, what: string): Promise<string> {
    const { data } = await this.deps.client.request('PATCH', `/api/storage/volumes/${uuid}`, {
      what,
      ref: this.ref,
      body: { clone: { split_initiated: true } },
      schema: JobLinkResponse,
    });
    return data.job.uuid;
  }

  /** After a restart without a checkpoint: the split job the appliance is running for this volume. */
  private async findRunningJob(uuid: string, what: string): Promise<string | undefined> {
    const { data } = await this.deps.client.request('GET', '/api/cluster/jobs', {
      what,
      ref: this.ref,
      query: { description: `PATCH /api/storage/volumes/${uuid}`, state: 'queued|running|paused', fields: 'state,description' },
      schema: Collection(Job),
    });
    return data.records[0]?.uuid;
  }

  /** Pause point; on cancel, cancel the appliance job too before giving up. */
  private async checkpoint(ctx: JobContext, jobUuid: string | undefined, what: string): Promise<void> {
    try {
      if (ctx.signal.aborted) throw new Cancelled(`${what}: cancelled`, { ref: this.ref });
      await ctx.checkpoint(0, jobUuid ? ({ jobUuid } satisfies SplitState) : undefined);
    } catch (e) {
      throw await this.cancelled(e, jobUuid, what, ctx);
    }
  }

  private async cancelled(e: unknown, jobUuid: string | undefined, what: string, ctx: JobContext): Promise<unknown> {
    if (!ctx.signal.aborted && !isOffloadError(e, 'Cancelled')) return e;
    // Stopped for a later run (the broker shutting down) or lost to another runner: that run
    // follows the appliance's split, which goes on meanwhile.
    if (leftForNextRun(e)) return e;
    if (leftForNextRun(ctx.signal.reason, ctx)) return leftForNextRun(ctx.signal.reason) ? ctx.signal.reason : new LeaseLost(`${what}: this runner no longer holds the job; the split goes on for the one that does`);
    if (jobUuid !== undefined) {
      try {
        await this.deps.client.request('PATCH', `/api/cluster/jobs/${jobUuid}`, { what: `${what}: cancel`, ref: this.ref, query: { action: 'cancel' } });
      } catch {
        // The job may have ended or expired meanwhile; the broker job is cancelled either way.
      }
    }
    return isOffloadError(e, 'Cancelled') ? e : new Cancelled(`${what}: cancelled`, { ref: this.ref });
  }

  /** Progress from the appliance: percent done and the bytes it still has to copy. */
  private report(ctx: JobContext, v: Volume): void {
    const pct = v.clone?.split_complete_percent;
    const remaining = v.clone?.split_estimate;
    if (pct === undefined || remaining === undefined) return;
    // Resumed mid-split: the total is inferred from the percentage (approximate).
    if (this.total === 0) this.total = pct < 100 ? Math.round((remaining * 100) / (100 - pct)) : remaining;
    this.current = Math.max(this.current, Math.min(this.total, this.total - remaining));
    ctx.setProgress(this.current, this.total);
  }
}

function sleepUnlessAborted(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal.removeEventListener('abort', done);
      resolve();
    }
    signal.addEventListener('abort', done, { once: true });
  });
}
