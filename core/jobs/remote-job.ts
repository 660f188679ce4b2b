import { errorFromCode, FailedPrecondition, InvalidArgument, NotFound } from '../model/errors.js';
import { assertVerb } from './job-states.js';
import type { Job, JobEvent, JobInfo } from './job.js';
import type { JobRecord, JobStore } from './job-store.js';

/** What a job's record shows of it: `orphaned` when nobody runs it (the job manager knows). */
export function recordToInfo(r: JobRecord, orphaned = false): JobInfo {
  const {
    backend: _b, checkpoint: _c, runnerPid: _p, runnerToken: _t, runnerHost: _h, leaseExpires: _e, seenAt: _s, fence: _f,
    request: _r, locks: _l, ownerRole: _o, ...info
  } = r;
  const out: JobInfo = info;
  if (r.seenAt > 0) out.runner = { host: r.runnerHost, pid: r.runnerPid, seenAt: new Date(r.seenAt).toISOString() };
  if (orphaned) out.orphaned = true;
  return out;
}

/**
 * A job another process runs (e.g. `offload stream` in one terminal, `offload jobs cancel` in
 * another): reads come from the store, verbs are stored as requests that the running process
 * applies within a fraction of a second.
 */
export class RemoteJob implements Job {
  constructor(
    readonly id: string,
    private readonly store: JobStore,
    /** Whether nobody runs a record any more (else wait() would never end). */
    private readonly orphaned: (r: JobRecord) => boolean,
  ) {}

  private record(): JobRecord {
    const r = this.store.get(this.id);
    if (!r) throw new NotFound(`job ${this.id} does not exist`, { ref: this.id, hint: 'list jobs with `offload jobs list`' });
    return r;
  }

  /** A verb needs a runner to apply it: an orphaned job has none until it is taken over. */
  private runnable(): JobRecord {
    const r = this.record();
    if (this.orphaned(r)) {
      throw new FailedPrecondition(`job ${this.id} is orphaned: nobody runs it to apply this`, {
        ref: r.ref, hint: `take it over first (\`offload jobs resume ${this.id}\`, broker.jobs.takeOver)`,
      });
    }
    return r;
  }

  info(): JobInfo {
    const r = this.record();
    return recordToInfo(r, this.orphaned(r));
  }

  pause(): void {
    const { status } = this.runnable();
    assertVerb('pause', status, this.id);
    if (status === 'paused' || status === 'standby') throw new FailedPrecondition(`job ${this.id} is already paused`, { ref: this.id });
    this.store.setRequest(this.id, { verb: 'pause' });
  }

  resume(): void {
    const { status } = this.runnable();
    assertVerb('resume', status, this.id);
    if (status !== 'paused' && status !== 'standby') throw new FailedPrecondition(`job ${this.id} is not paused`, { ref: this.id });
    this.store.setRequest(this.id, { verb: 'resume' });
  }

  cancel(): void {
    assertVerb('cancel', this.runnable().status, this.id);
    this.store.setRequest(this.id, { verb: 'cancel' });
  }

  complete(): void {
    assertVerb('complete', this.runnable().status, this.id);
    this.store.setRequest(this.id, { verb: 'complete' });
  }

  setSpeed(bytesPerSecond: number): void {
    assertVerb('set-speed', this.runnable().status, this.id);
    if (!Number.isFinite(bytesPerSecond) || bytesPerSecond < 0) {
      throw new InvalidArgument(`speed must be a number of bytes per second ≥ 0 (0 = unlimited), got ${bytesPerSecond}`);
    }
    this.store.setRequest(this.id, { verb: 'set-speed', speed: bytesPerSecond });
  }

  dismiss(): void {
    assertVerb('dismiss', this.record().status, this.id);
    this.store.delete(this.id);
  }

  async wait(): Promise<JobInfo> {
    for (;;) {
      const rec = this.record();
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
    let last = '';
    const timer = setInterval(() => {
      let info: JobInfo;
      try {
        info = this.info();
      } catch {
        clearInterval(timer);
        return;
      }
      const key = `${info.status}:${info.progress.current}:${info.progress.total}`;
      if (key === last) return;
      const statusChanged = !last.startsWith(`${info.status}:`);
      last = key;
      listener({ type: statusChanged ? 'status' : 'progress', job: info });
      if (info.status === 'concluded') clearInterval(timer);
    }, 250);
    timer.unref();
    return () => clearInterval(timer);
  }
}
