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
import { fillTask, type FillPair, type FillPairDeps, type FillParams } from '../live/fill-task.js';
import { AlreadyExists, InvalidArgument, toOffloadError } from '../model/errors.js';
import { isSnapshotRef, parseRef, parseVolumeRef, volumeKey } from '../model/refs.js';
import type { Plan } from '../planner/plan.js';
import type { Access } from './access.js';
import { checkSize, checkSpeed, readerWithin, readLocks } from './operation.js';
import type { BrokerState } from './state.js';


/**
 * The fill job's task, with the broker's side of it: each target's exports find its fill in
 * `s.fills` while it runs; cancelled, the targets' exports stop and they are deleted.
 */
export function instantCloneTask(s: BrokerState, params: FillParams): JobTask {
  const parts = params.pairs.map((pair) => pairDeps(s, pair));
  const task = fillTask(params, parts.map((p) => p.deps));
  return {
    ...task,
    dropped: () => {
      for (const p of parts) p.drop();
    },
  };
}

function pairDeps(s: BrokerState, pair: FillPair): { deps: FillPairDeps; drop(): void } {
  let resolve!: (v: { fill: Fill; jobId: string }) => void;
  let reject!: (e: unknown) => void;
  const ready = new Promise<{ fill: Fill; jobId: string }>((res, rej) => { resolve = res; reject = rej; });
  ready.catch(() => undefined);
  const entry: FillEntry = { ready };
  s.fills.set(pair.target, entry);
  const forget = () => {
    if (s.fills.get(pair.target) === entry) s.fills.delete(pair.target);
  };
  const deps = s.cloneDeps();
  const stopExports = async () => {
    await Promise.allSettled(s.exports.list().filter((e) => e.ref === pair.target).map((e) => s.exports.stop(e.name)));
  };
  return {
    deps: {
      openSource: () => deps.open(pair.source, 'r'),
      createTarget: async () => {
        if (await deps.find(pair.target)) throw new AlreadyExists(`${pair.target} already exists; an instant clone makes a new volume`, { ref: pair.target });
        await deps.create(pair.target, pair.sizeBytes, pair.owner);
      },
      openTarget: () => deps.open(pair.target, 'rw'),
      register: (fill, jobId) => resolve({ fill, jobId }),
      unregister: (error) => {
        forget();
        reject(error ?? new InvalidArgument('the fill has ended'));
      },
      abandon: async () => {
        await stopExports();
        if (!(await deps.find(pair.target).catch(() => undefined))) return;
        await deps.remove(pair.target).catch((e: unknown) => s.logger.warn(`deleting ${pair.target} after its instant clone was cancelled failed: ${toOffloadError(e).message}`));
      },
      stopExports,
    },
    drop: () => {
      forget();
      reject(new InvalidArgument(`the instant clone into ${pair.target} is not running`));
    },
  };
}

/** `clone --instant` for one principal's broker view. */
export class InstantClones {
  constructor(private readonly s: BrokerState, private readonly a: Access) {}

  /** One job for every pair (the disks of one VM); `sourceSize` reads a source's size. */
  async start(pairs: { source: string; target: string }[], opts: CloneOptions, plan: Plan, sourceSize: (source: string) => Promise<number>): Promise<Job> {
    if (opts.mode === 'linked') throw new InvalidArgument('an instant clone is a full copy made in the background; --linked shares data instead', { hint: 'leave out --linked' });
    if (opts.verify) throw new InvalidArgument('--verify does not apply to an instant clone: the clone may be written while it fills', { hint: 'leave out --verify' });
    if (pairs.length > 1 && opts.sizeBytes !== undefined) throw new InvalidArgument('--size applies to one clone; several are each the size of their source');
    const seen = new Set<string>();
    const made: FillPair[] = [];
    for (const p of pairs) {
      const src = parseRef(p.source);
      const dst = parseVolumeRef(p.target);
      const ref = volumeKey(dst);
      if (seen.has(ref)) throw new InvalidArgument(`${ref} is the target of two clones`, { ref });
      seen.add(ref);
      await this.a.assertOwns(src);
      const d = this.s.entry(dst.backend);
      const srcSize = await sourceSize(p.source);
      const size = opts.sizeBytes === undefined ? srcSize : checkSize(opts.sizeBytes, ref, d.capabilities);
      if (size < srcSize) throw new InvalidArgument(`clone size ${size} is smaller than the source's ${srcSize} bytes`, { ref });
      if (await this.s.cloneDeps().find(ref)) throw new AlreadyExists(`${ref} already exists; an instant clone makes a new volume`, { ref, hint: 'delete it first, or name another' });
      const owner = await this.a.targetOwner(dst, d.backend, this.a.ownerFor(opts.owner), opts.owner !== undefined);
      made.push({ source: `${src.backend}/${src.volume}${isSnapshotRef(src) ? `@${src.snapshot}` : ''}`, target: ref, sizeBytes: size, owner });
    }
    const locks = [...readLocks(...made.map((p) => parseRef(p.source))), ...made.map((p) => ({ key: p.target, mode: 'exclusive' as const }))];
    // Points of a disk in use are read within what it is in use through (readerWithin).
    const within = await readerWithin(this.s, locks);
    const speed = checkSpeed(opts.speed);
    this.s.assertOpen();
    const task = instantCloneTask(this.s, { pairs: made, ...(opts.copyOnRead ? { copyOnRead: true } : {}) });
    let job: Job;
    try {
      job = await this.s.mutex.run(locks.map((l) => l.key), () => this.s.jobs.start({
        task, ref: made.map((p) => p.target).join(','), executor: 'host', principal: this.a.principal, locks, plan, ...(speed ? { speed } : {}), ...(within.length > 0 ? { within } : {}),
        check: async () => {
          for (const p of made) await this.a.assertOwns(parseRef(p.source)); // again under the job's locks
        },
      }));
    } catch (e) {
      task.dropped?.();
      throw e;
    }
    // Usable from here: the targets exist and an export of each serves through its fill.
    for (const p of made) await this.s.fills.get(p.target)?.ready.catch(() => undefined);
    return job;
  }
}
