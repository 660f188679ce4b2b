/** The broker's jobs and locks verbs for one principal: a tenant sees and acts on its own only. */
import type { JobsApi, LocksApi } from '../broker-api.js';
import type { Job, JobInfo } from '../jobs/job.js';
import type { LockInfo } from '../locks/lock-manager.js';
import { InvalidArgument, NotFound } from '../model/errors.js';
import { parseVolumeRef, volumeKey } from '../model/refs.js';
import type { Access } from './access.js';
import type { BrokerState } from './state.js';

/** The jobs verbs of one principal's broker view. */
export class Jobs implements JobsApi {
  constructor(private readonly s: BrokerState, private readonly a: Access) {}

  async list(filter?: { status?: string; all?: boolean }): Promise<JobInfo[]> {
    this.s.assertOpen();
    // `orphaned` is a status as the CLI shows it: the job's own status is the last its runner set.
    const wanted = (j: JobInfo) => filter?.status === undefined || (filter.status === 'orphaned' ? j.orphaned === true : j.status === filter.status && !j.orphaned);
    return (await this.s.jobs.list()).filter((j) => this.a.mayAccessJob(j.owner) && wanted(j));
  }

  /** A job this principal may see (another tenant's is NotFound, as if it did not exist). */
  async get(id: string): Promise<Job> {
    this.s.assertOpen();
    if (typeof id !== 'string' || id.length === 0) throw new InvalidArgument(`a job id is a non-empty string, got ${JSON.stringify(id)}`);
    const job = await this.s.jobs.get(id);
    if (!this.a.mayAccessJob(job.info().owner)) throw new NotFound(`job ${id} does not exist`, { ref: id });
    return job;
  }

  async cancel(id: string): Promise<void> { await (await this.get(id)).cancel(); }
  async pause(id: string): Promise<void> { await (await this.get(id)).pause(); }
  async resume(id: string): Promise<void> { await (await this.get(id)).resume(); }
  async complete(id: string): Promise<void> { await (await this.get(id)).complete(); }
  async dismiss(id: string): Promise<void> { await (await this.get(id)).dismiss(); }
  async setSpeed(id: string, bytesPerSecond: number): Promise<void> { await (await this.get(id)).setSpeed(bytesPerSecond); }
  async wait(id: string): Promise<JobInfo> { return (await this.get(id)).wait(); }

  async takeOver(id: string): Promise<Job> {
    await this.get(id); // NotFound for a job this principal may not see
    return this.s.jobs.takeOver(id);
  }
}

/** The locks verbs of one principal's broker view (maintenance locks are administrators' only). */
export class Locks implements LocksApi {
  constructor(private readonly s: BrokerState, private readonly a: Access) {}

  async maintenance(ref: string, reason: string): Promise<void> {
    this.s.assertOpen();
    await this.s.locks.placeMaintenance(volumeKey(parseVolumeRef(ref)), this.a.principal, reason);
  }

  async release(ref: string): Promise<void> {
    this.s.assertOpen();
    await this.s.locks.breakMaintenance(volumeKey(parseVolumeRef(ref)), this.a.principal);
  }

  async list(): Promise<LockInfo[]> {
    this.s.assertOpen();
    const all = await this.s.locks.list();
    if (this.a.isAdmin) return all;
    const mine = await Promise.all(all.map(async (l) => (await this.s.ownerOf(l.key)) === this.a.principal.id));
    return all.filter((_, i) => mine[i]);
  }
}
