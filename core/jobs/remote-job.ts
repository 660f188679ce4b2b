import { errorFromCode, FailedPrecondition, InvalidArgument, NotFound } from '../model/errors.js';
import { assertVerb } from './job-states.js';
import { pollJobEvents } from './poll-events.js';
import type { Job, JobEvent, JobInfo } from './job.js';
import type { JobRecord } from '../state/records.js';
import type { StateStore } from '../state/state-store.js';

/** What a job's record shows of it: `orphaned` when nobody runs it (the job manager knows). */
export function recordToInfo(r: JobRecord, orphaned = false): JobInfo {
  const {
    backend: _b, checkpoint: _c, runnerPid: _p, runnerToken: _t, runnerHost: _h, leaseExpires: _e, seenAt: _s, fence: _f,
    request: _r, locks: _l, ownerRole: _o, ...info
  } = r;
  const out: JobInfo = info;
  if (r.seenAt > 0) out.runner = { host: r.runnerHost, pid: r.runnerPid, seenAt: new Date(r.seenAt).toISOString() };
  if (orphaned) out.orphaned = true;
  const side = (r.checkpoint as { authoritative?: unknown } | undefined)?.authoritative;
  const pairs = r.params.pairs;
  if ((side === 'source' || side === 'target') && Array.isArray(pairs) && pairs.length > 0) {
    const refs = (pairs as Record<string, unknown>[]).map((p) => String(p[side]));
    out.authoritative = { side, ref: refs[0]!, ...(refs.length > 1 ? { refs } : {}) };
  }
  const points = (r.checkpoint as { points?: unknown } | undefined)?.points;
  if (Array.isArray(points) && points.some((p) => typeof p === 'string')) out.resumeSince = points.map((p) => (typeof p === 'string' ? p : null));
  const resumedBy = (r.checkpoint as { resumedBy?: unknown } | undefined)?.resumedBy;
  if (typeof resumedBy === 'string') out.resumedBy = resumedBy;
  else if (out.resumeSince && Array.isArray((r.checkpoint as { pending?: unknown }).pending)) out.suspended = true;
  else if (r.status === 'concluded' && !r.cancelled && side === 'source' && Array.isArray((r.checkpoint as { intent?: unknown }).intent)) out.crashed = true;
  return out;
}

/**
 * A job another process runs (e.g. `offload stream` in one terminal, `offload jobs cancel` in
 * another): reads come from the store, verbs are stored as requests that the running process
 * applies within a fraction of a second. info() is the record as last read (when the job was
 * looked up, and again by every verb, wait() and the on() poll).
 */
export class RemoteJob implements Job {
  readonly id: string;
  private last: JobRecord;

  constructor(
    record: JobRecord,
    private readonly store: StateStore,
    /** Whether nobody runs a record any more (else wait() would never end). */
    private readonly orphaned: (r: JobRecord) => boolean,
    /** Run before the record is deleted (JobManagerOptions.beforeDismiss). */
    private readonly beforeDismiss?: (r: JobRecord) => Promise<void>,
  ) {
    this.id = record.id;
    this.last = record;
  }

  private async record(): Promise<JobRecord> {
    const r = await this.store.getJob(this.id);
    if (!r) throw new NotFound(`job ${this.id} does not exist`, { ref: this.id, hint: 'list jobs with `offload jobs list`' });
    this.last = r;
    return r;
  }

  /** A verb needs a runner to apply it: an orphaned job has none until it is taken over. */
  private async runnable(): Promise<JobRecord> {
    const r = await this.record();
    if (this.orphaned(r)) {
      throw new FailedPrecondition(`job ${this.id} is orphaned: nobody runs it to apply this`, {
        ref: r.ref, hint: `take it over first (\`offload jobs resume ${this.id}\`, broker.jobs.takeOver)`,
      });
    }
    return r;
  }

  info(): JobInfo {
    return recordToInfo(this.last, this.orphaned(this.last));
  }

  async pause(): Promise<void> {
    const { status } = await this.runnable();
    assertVerb('pause', status, this.id);
    if (status === 'paused' || status === 'standby') throw new FailedPrecondition(`job ${this.id} is already paused`, { ref: this.id });
    await this.store.setRequest(this.id, { verb: 'pause' });
  }

  async resume(): Promise<void> {
    const { status } = await this.runnable();
    assertVerb('resume', status, this.id);
    if (status !== 'paused' && status !== 'standby') throw new FailedPrecondition(`job ${this.id} is not paused`, { ref: this.id });
    await this.store.setRequest(this.id, { verb: 'resume' });
  }

  async cancel(): Promise<void> {
    assertVerb('cancel', (await this.runnable()).status, this.id);
    await this.store.setRequest(this.id, { verb: 'cancel' });
  }

  async complete(): Promise<void> {
    assertVerb('complete', (await this.runnable()).status, this.id);
    await this.store.setRequest(this.id, { verb: 'complete' });
  }

  async setSpeed(bytesPerSecond: number): Promise<void> {
    assertVerb('set-speed', (await this.runnable()).status, this.id);
    if (!Number.isFinite(bytesPerSecond) || bytesPerSecond < 0) {
      throw new InvalidArgument(`speed must be a number of bytes per second ≥ 0 (0 = unlimited), got ${bytesPerSecond}`);
    }
    await this.store.setRequest(this.id, { verb: 'set-speed', speed: bytesPerSecond });
  }

  async dismiss(): Promise<void> {
    const rec = await this.record();
    assertVerb('dismiss', rec.status, this.id);
    await this.beforeDismiss?.(rec);
    await this.store.deleteJob(this.id);
  }

  async wait(): Promise<JobInfo> {
    for (;;) {
      const rec = await this.record();
      if (rec.status === 'concluded') return recordToInfo(rec);
      if (this.orphaned(rec)) {
        throw new FailedPrecondition(`job ${this.id} is orphaned: the process that ran it stopped`, {
          ref: rec.ref, hint: `take it over with \`offload jobs resume ${this.id}\``,
        });
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  async result(): Promise<JobInfo> {
    const info = await this.wait();
    if (info.error) throw errorFromCode(info.error.code, info.error.message, { ref: info.ref });
    return info;
  }

  /** Polls the store and reports status and progress changes. */
  on(listener: (event: JobEvent) => void): () => void {
    return pollJobEvents(async () => {
      const rec = await this.record();
      return recordToInfo(rec, this.orphaned(rec));
    }, listener);
  }
}
