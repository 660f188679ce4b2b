/**
 * The host data mover's jobs: a copy into an existing volume, and a clone through the host (create
 * the target, then copy into it). Their params are plain JSON, so a restarted broker rebuilds them
 * and they continue from their checkpoint.
 */
import type { BlockDevice } from '../backend/block-device.js';
import { Shutdown } from '../jobs/job-run.js';
import type { JobContext, JobTask } from '../jobs/job-task.js';
import { AlreadyExists } from '../model/errors.js';
import { copyData } from './copier.js';

export interface HostCopyParams extends Record<string, unknown> {
  source: string;
  target: string;
  /** The target was created empty for this copy: unallocated source ranges can be skipped. */
  targetFresh: boolean;
  /** Compare checksums of source and target after the copy. */
  verify?: boolean;
}

/** Opens a ref's data path; provided by the broker. */
export type DeviceOpener = (ref: string, mode: 'r' | 'rw') => Promise<BlockDevice>;

/** The host data mover as a JobTask: opens both data paths and runs the copier between them. */
export function hostCopyTask(params: HostCopyParams, open: DeviceOpener): JobTask {
  return { type: 'copy', params, run: (ctx) => copyBetween(params, open, ctx) };
}

async function copyBetween(params: HostCopyParams, open: DeviceOpener, ctx: JobContext, state?: Record<string, unknown>): Promise<void> {
  const src = await open(params.source, 'r');
  let dst: BlockDevice | undefined;
  try {
    dst = await open(params.target, 'rw');
    await copyData(src, dst, ctx, { targetFresh: params.targetFresh, verify: params.verify === true, ...(state ? { state } : {}) });
  } finally {
    await Promise.allSettled([src.close(), dst?.close()]);
  }
}

export interface HostCloneParams extends HostCopyParams {
  /** Size of the new volume (at least the source's). */
  sizeBytes: number;
  /** The principal the new volume belongs to. */
  owner: string;
}

export interface CloneDeps {
  open: DeviceOpener;
  exists(ref: string): Promise<boolean>;
  /** Create the target volume and record its owner. */
  create(ref: string, sizeBytes: number, owner: string): Promise<void>;
  /** Delete the target volume and its owner record. */
  remove(ref: string): Promise<void>;
}

/**
 * A clone through the host as one job, which holds the target's exclusive lock from before the
 * target exists until the copy ends: it creates the target (refusing a name that is taken: a
 * clone never adopts another's volume), records that it did in its checkpoint, copies, and
 * deletes what it created when it fails or is cancelled. Stopped for a resume (the broker
 * closing), it leaves the target for the resumed run.
 */
export function cloneTask(params: HostCloneParams, deps: CloneDeps): JobTask {
  return {
    type: 'clone',
    params,
    async run(ctx) {
      // A run resumed after the create began (`created`) takes the target as its own: the
      // exclusive lock kept everyone else off the name while this job ran.
      const resumed = ctx.resumeFrom as { created?: unknown } | undefined;
      let created = resumed?.created === true;
      try {
        if (!created) {
          if (await deps.exists(params.target)) {
            throw new AlreadyExists(`${params.target} already exists; a clone through the host needs a new volume`, {
              ref: params.target, hint: 'delete it first, or use `offload copy` to overwrite it',
            });
          }
          ctx.saveState({ created: true });
          created = true;
          await deps.create(params.target, params.sizeBytes, params.owner);
        } else if (!(await deps.exists(params.target))) {
          await deps.create(params.target, params.sizeBytes, params.owner); // stopped between the record and the create
        }
        await copyBetween(params, deps.open, ctx, { created: true });
      } catch (e) {
        if (created && !(e instanceof Shutdown)) await deps.remove(params.target).catch(() => undefined);
        throw e;
      }
    },
  };
}
