/** The broker's jobs and locks verbs for one principal: a tenant sees and acts on its own only. */
import type { JobsApi, LocksApi } from '../broker-api.js';
import type { Job, JobInfo } from '../jobs/job.js';
import type { LockInfo } from '../locks/lock-manager.js';
import { NotFound } from '../model/errors.js';
import { parseVolumeRef, volumeKey } from '../model/refs.js';
import type { Access } from './access.js';
import type { BrokerState } from './state.js';

/** The jobs verbs of one principal's broker view. */
export class Jobs implements JobsApi {
  constructor(private readonly s: BrokerState, private readonly a: Access) {}

  list(filter?: { status?: string; all?: boolean }): JobInfo[] {
    this.s.assertOpen();
    // `orphaned` is a status as the CLI shows it: the job's own status is the last its runner set.
    const wanted = (j: JobInfo) => filter?.status === undefined || (filter.status === 'orphaned' ? j.orphaned === true : j.status === filter.status && !j.orphaned);
    return this.s.jobs.list().filter((j) => this.a.mayAccessJob(j.owner) && wanted(j));
  }

  /** A job this principal may see (another tenant's is NotFound, as if it did not exist). */
  get(id: string): Job {
    this.s.assertOpen();
    const job = this.s.jobs.get(id);
    if (!this.a.mayAccessJob(job.info().owner)) throw new NotFound(`job ${id} does not exist`, { ref: id });
    return job;
  }

  cancel(id: string): void { this.get(id).cancel(); }
  pause(id: string): void { this.get(id).pause(); }
  resume(id: string): void { this.get(id).resume(); }
  complete(id: string): void { this.get(id).complete(); }
  dismiss(id: string): void { this.get(id).dismiss(); }
  setSpeed(id: string, bytesPerSecond: number): void { this.get(id).setSpeed(bytesPerSecond); }
  wait(id: string): Promise<JobInfo> { return this.get(id).wait(); }

  takeOver(id: string): Promise<Job> {
    this.get(id); // NotFound for a job this principal may not see
    return this.s.jobs.takeOver(id);
  }
}

/** The locks verbs of one principal's broker view (maintenance locks are administrators' only). */
export class Locks implements LocksApi {
  constructor(private readonly s: BrokerState, private readonly a: Access) {}

  maintenance(ref: string, reason: string): void {
    this.s.locks.placeMaintenance(volumeKey(parseVolumeRef(ref)), this.a.principal, reason);
  }

  release(ref: string): void {
    this.s.locks.breakMaintenance(volumeKey(parseVolumeRef(ref)), this.a.principal);
  }

  list(): LockInfo[] {
    return this.s.locks.list().filter((l) => this.a.isAdmin || this.s.store.getOwner(l.key) === this.a.principal.id);
  }
}
