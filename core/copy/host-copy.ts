/**
 * The host data mover's jobs: a copy into an existing volume, and a clone through the host (create
 * the target, then copy into it). Their params are plain JSON, so a restarted broker rebuilds them
 * and they continue from their checkpoint.
 */
import type { BlockDevice, ByteRange } from '../backend/block-device.js';
import { closeAfter, leftForNextRun } from '../jobs/job-run.js';
import type { JobContext, JobTask } from '../jobs/job-task.js';
import { AlreadyExists, FailedPrecondition } from '../model/errors.js';
import { copyData } from './copier.js';

export interface HostCopyParams extends Record<string, unknown> {
  source: string;
  target: string;
  /** The target was created empty for this copy: unallocated source ranges can be skipped. */
  targetFresh: boolean;
  /** Compare checksums of source and target after the copy. */
  verify?: boolean;
  /**
   * Copy only what changed in the source since its snapshot of this name: the target holds that
   * snapshot's data already (an incremental copy; the source's backend says what changed).
   */
  since?: string;
}

/** What changed in a source (a volume or snapshot ref) since its snapshot `since`; provided by the broker. */
export type ChangeLister = (source: string, since: string) => Promise<ByteRange[]>;

/** Opens a ref's data path; provided by the broker. */
export type DeviceOpener = (ref: string, mode: 'r' | 'rw') => Promise<BlockDevice>;

/** The host data mover as a JobTask: opens both data paths and runs the copier between them. */
export function hostCopyTask(params: HostCopyParams, open: DeviceOpener, changes?: ChangeLister): JobTask {
  return { type: 'copy', params, run: (ctx) => copyBetween(params, open, ctx, undefined, changes) };
}

async function copyBetween(params: HostCopyParams, open: DeviceOpener, ctx: JobContext, state?: Record<string, unknown>, changes?: ChangeLister): Promise<void> {
  // The changes are asked again on a resume: between two snapshots they are the same answer.
  let only: ByteRange[] | undefined;
  if (params.since !== undefined) {
    if (!changes) throw new FailedPrecondition(`copy of ${params.source} since ${params.since}: no way to list the changes here`, { ref: params.source });
    only = await changes(params.source, params.since);
  }
  const src = await open(params.source, 'r');
  let dst: BlockDevice | undefined;
  try {
    dst = await open(params.target, 'rw');
    await copyData(src, dst, ctx, { targetFresh: params.targetFresh, verify: params.verify === true, ...(state ? { state } : {}), ...(only ? { only } : {}) });
  } finally {
    await Promise.allSettled([src.close(), dst?.close(closeAfter(ctx))]);
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
  /** The target as the backend reports it now (undefined: none). */
  find(ref: string): Promise<{ createdAt?: string } | undefined>;
  /** Create the target volume and record its owner; resolves with it. */
  create(ref: string, sizeBytes: number, owner: string): Promise<{ createdAt?: string }>;
  /** Record the target's owner (again, after a resume). */
  own(ref: string, owner: string): Promise<void>;
  /** Delete the target volume and its owner record. */
  remove(ref: string): Promise<void>;
}

/** What a clone job has saved about its target: about to create it, or created (and when, as the backend said). */
interface CloneState { creating?: boolean; created?: boolean; createdAt?: string }

/** Which job makes a new volume by copying into it (a clone, an import that creates its volume), for its type and messages. */
export interface CloneKind {
  /** The job type (`clone`, `import`). */
  type: string;
  /** What it is, in a sentence: `a clone through the host`. */
  what: string;
  /** What to do when the name is taken. */
  hint: string;
}

const HOST_CLONE: CloneKind = { type: 'clone', what: 'a clone through the host', hint: 'delete it first, or use `offload copy` to overwrite it' };

/**
 * A clone through the host as one job, which holds the target's exclusive lock from before the
 * target exists until the copy ends: it refuses a name that is taken (a clone never adopts
 * another's volume), records that it is about to create the target, creates it, records that it
 * did, copies, and deletes what it created when it fails or is cancelled. Stopped for a resume
 * (the broker closing), it leaves the target for the resumed run, which takes it back only when
 * it is the one this job made.
 */
export function cloneTask(params: HostCloneParams, deps: CloneDeps, kind: CloneKind = HOST_CLONE): JobTask {
  const refuse = (why: string) => new AlreadyExists(`${params.target} already exists${why}; ${kind.what} needs a new volume`, {
    ref: params.target, hint: kind.hint,
  });
  return {
    type: kind.type,
    params,
    async run(ctx) {
      const was = (ctx.resumeFrom ?? {}) as CloneState;
      const found = await deps.find(params.target);
      let created = false;
      let createdAt: string | undefined;
      if (was.created === true) {
        // Resumed after the create: the volume there must be the one this job made.
        if (!found) throw new FailedPrecondition(`${params.target}, which this ${kind.type} created, is gone`, { ref: params.target, hint: `${kind.type} again` });
        if (was.createdAt !== undefined && found.createdAt !== undefined && found.createdAt !== was.createdAt) {
          throw refuse(` and is not the volume this ${kind.type} created (it was replaced while the job was stopped)`);
        }
        created = true;
        createdAt = was.createdAt;
        await deps.own(params.target, params.owner);
      } else {
        // A run stopped between recording `creating` and recording `created` cannot tell whether
        // a volume there is its own: it leaves it alone.
        if (found) throw refuse(was.creating === true ? ` (it may be the one this ${kind.type} was creating when it stopped: check it, delete it and ${kind.type} again)` : '');
        await ctx.saveState({ creating: true } satisfies CloneState);
        createdAt = (await deps.create(params.target, params.sizeBytes, params.owner)).createdAt;
        created = true;
        await ctx.saveState({ created: true, ...(createdAt !== undefined ? { createdAt } : {}) } satisfies CloneState);
      }
      try {
        await copyBetween(params, deps.open, ctx, { created: true, ...(createdAt !== undefined ? { createdAt } : {}) });
      } catch (e) {
        if (created && !leftForNextRun(e, ctx)) await deps.remove(params.target).catch(() => undefined);
        throw e;
      }
    },
  };
}
