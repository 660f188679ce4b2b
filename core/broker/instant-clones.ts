/**
 * Instant clone (`clone --instant`): the new volume exists and can be exported at once while a
 * fill job copies the source into it in the background (the mechanism: core/live/fill.ts). An
 * export of the target started meanwhile serves it through the fill (reads of what is not
 * copied yet come from the source), so it runs in the broker that runs the job.
 */
import type { CloneOptions } from '../broker-api.js';
import type { Job } from '../jobs/job.js';
import type { JobTask } from '../jobs/job-task.js';
import type { Fill, FillEntry } from '../live/fill.js';
import { fillTask, type FillParams } from '../live/fill-task.js';
import { AlreadyExists, InvalidArgument, toOffloadError } from '../model/errors.js';
import { isSnapshotRef, parseRef, parseVolumeRef, volumeKey } from '../model/refs.js';
import type { Plan } from '../planner/plan.js';
import type { Access } from './access.js';
import { checkSize, checkSpeed } from './operation.js';
import type { BrokerState } from './state.js';


/**
 * The fill job's task, with the broker's side of it: the target's exports find the fill in
 * `s.fills` while it runs; cancelled, the target's exports stop and it is deleted.
 */
export function instantCloneTask(s: BrokerState, params: FillParams): JobTask {
  let resolve!: (v: { fill: Fill; jobId: string }) => void;
  let reject!: (e: unknown) => void;
  const ready = new Promise<{ fill: Fill; jobId: string }>((res, rej) => { resolve = res; reject = rej; });
  ready.catch(() => undefined);
  const entry: FillEntry = { ready };
  s.fills.set(params.target, entry);
  const forget = () => {
    if (s.fills.get(params.target) === entry) s.fills.delete(params.target);
  };
  const deps = s.cloneDeps();
  const stopExports = async () => {
    await Promise.allSettled(s.exports.list().filter((e) => e.ref === params.target).map((e) => s.exports.stop(e.name)));
  };
  let jobId = '';
  const task = fillTask(params, {
    openSource: () => deps.open(params.source, 'r'),
    createTarget: async () => {
      if (await deps.find(params.target)) throw new AlreadyExists(`${params.target} already exists; an instant clone makes a new volume`, { ref: params.target });
      await deps.create(params.target, params.sizeBytes, params.owner);
    },
    openTarget: () => deps.open(params.target, 'rw'),
    register: (fill) => resolve({ fill, jobId }),
    unregister: (error) => {
      forget();
      reject(error ?? new InvalidArgument('the fill has ended'));
    },
    abandon: async () => {
      await stopExports();
      await deps.remove(params.target).catch((e: unknown) => s.logger.warn(`deleting ${params.target} after its instant clone was cancelled failed: ${toOffloadError(e).message}`));
    },
    stopExports,
  });
  return {
    ...task,
    run: (ctx) => {
      jobId = ctx.jobId;
      return task.run(ctx);
    },
    dropped: () => {
      forget();
      reject(new InvalidArgument(`the instant clone into ${params.target} is not running`));
    },
  };
}

/** `clone --instant` for one principal's broker view. */
export class InstantClones {
  constructor(private readonly s: BrokerState, private readonly a: Access) {}

  async start(source: string, target: string, opts: CloneOptions, plan: Plan, sourceSize: number): Promise<Job> {
    if (opts.mode === 'linked') throw new InvalidArgument('an instant clone is a full copy made in the background; --linked shares data instead', { hint: 'leave out --linked' });
    if (opts.verify) throw new InvalidArgument('--verify does not apply to an instant clone: the clone may be written while it fills', { hint: 'leave out --verify' });
    const src = parseRef(source);
    const dst = parseVolumeRef(target);
    const ref = volumeKey(dst);
    const d = this.s.entry(dst.backend);
    const size = opts.sizeBytes === undefined ? sourceSize : checkSize(opts.sizeBytes, ref, d.capabilities);
    if (size < sourceSize) throw new InvalidArgument(`clone size ${size} is smaller than the source's ${sourceSize} bytes`, { ref });
    if (await this.s.cloneDeps().find(ref)) throw new AlreadyExists(`${ref} already exists; an instant clone makes a new volume`, { ref, hint: 'delete it first, or name another' });
    const owner = await this.a.targetOwner(dst, d.backend, this.a.ownerFor(opts.owner), opts.owner !== undefined);
    const params: FillParams = { source: `${src.backend}/${src.volume}${isSnapshotRef(src) ? `@${src.snapshot}` : ''}`, target: ref, sizeBytes: size, owner };
    const locks = [{ key: volumeKey(src), mode: 'shared' as const }, { key: ref, mode: 'exclusive' as const }];
    const speed = checkSpeed(opts.speed);
    this.s.assertOpen();
    const task = instantCloneTask(this.s, params);
    let job: Job;
    try {
      job = await this.s.mutex.run(locks.map((l) => l.key), () => this.s.jobs.start({
        task, ref, executor: 'host', principal: this.a.principal, locks, plan, ...(speed ? { speed } : {}),
      }));
    } catch (e) {
      task.dropped?.();
      throw e;
    }
    // Usable from here: the target exists and an export of it serves through the fill.
    await this.s.fills.get(ref)?.ready.catch(() => undefined);
    return job;
  }
}
