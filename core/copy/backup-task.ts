/**
 * One backup point as a resumable job: copy a snapshot of the source (its `marker`, taken just
 * before the job) into the backup volume — everything the first time, afterwards only what
 * changed since the previous point's marker (the source backend's `data.dirty`) — then snapshot
 * the backup volume as the point (`bN`), then drop the previous marker, which only the next
 * incremental needed. The backup volume's snapshots are the chain of points: on the pool, each is
 * a layer holding just that point's changes; on an array, a thin snapshot.
 *
 * Crash and cancel: a resumed run asks for the same changes (between two snapshots they do not
 * move) and goes on from the copier's checkpoint. A run that fails or is cancelled puts the
 * backup volume back to the previous point (or deletes it, when this run made it) and drops the
 * new marker, so the next backup starts from a state it can trust.
 */
import { Shutdown } from '../jobs/job-run.js';
import { FailedPrecondition } from '../model/errors.js';
import type { JobContext, JobTask } from '../jobs/job-task.js';
import { copyData } from './copier.js';
import type { ChangeLister, DeviceOpener } from './host-copy.js';

export interface BackupParams extends Record<string, unknown> {
  /** The volume backed up (`backend/volume`). */
  source: string;
  /** The backup volume (`backend/name`): its snapshots are the points. */
  target: string;
  /** This point's number: the backup volume's snapshot `b<point>`. */
  point: number;
  /** The source's snapshot this point copies (taken before the job). */
  marker: string;
  /** The previous point's marker on the source: copy only what changed since. Absent: a full copy. */
  base?: string;
  /** The previous point's number (what an incremental run starts from, and a failed run puts the backup volume back to). */
  previous?: number;
  /** The previous point's marker when it is not `base` (a full point again): dropped once this point exists. */
  previousMarker?: string;
  sizeBytes: number;
  owner: string;
}

export interface BackupDeps {
  open: DeviceOpener;
  changes: ChangeLister;
  size(ref: string): Promise<number | undefined>;
  create(ref: string, sizeBytes: number, owner: string): Promise<unknown>;
  resize(ref: string, sizeBytes: number): Promise<void>;
  /** Take a snapshot (`backend/volume@name`); one that exists already is kept. */
  snapshot(ref: string): Promise<void>;
  /** Delete a snapshot; one that is gone is fine. */
  deleteSnapshot(ref: string): Promise<void>;
  revert(ref: string): Promise<void>;
  remove(ref: string): Promise<void>;
}

/** Saved with each checkpoint (the copier adds its `offset`). */
interface BackupState { phase?: 'copy' | 'point' | 'tidy' | 'undo'; created?: boolean; reverted?: boolean }

export const pointName = (n: number): string => `b${n}`;

export function backupTask(params: BackupParams, deps: BackupDeps): JobTask {
  return {
    type: 'backup',
    params,
    async run(ctx) {
      const was = (ctx.resumeFrom ?? {}) as BackupState;
      if (was.phase === 'undo') {
        // Stopped while putting the backup volume back: finish that, and end as failed.
        await undo(params, deps, was.created === true);
        throw new FailedPrecondition(`the backup point ${pointName(params.point)} of ${params.source} failed and was undone; back up again`, { ref: params.target });
      }
      let created = was.created === true;
      try {
        if (was.phase === undefined || was.phase === 'copy') created = await copyPoint(params, deps, ctx, was, created);
        if (was.phase !== 'tidy') {
          await deps.snapshot(`${params.target}@${pointName(params.point)}`);
          await ctx.saveState({ phase: 'tidy' } satisfies BackupState);
        }
      } catch (e) {
        if (!(e instanceof Shutdown)) {
          // Recorded first: a kill while undoing must not resume the copy over an undone volume.
          await Promise.resolve(ctx.saveState({ phase: 'undo', created } satisfies BackupState)).catch(() => undefined);
          await undo(params, deps, created);
        }
        throw e;
      }
      // The point exists: the previous marker has served its purpose.
      for (const old of [params.base, params.previousMarker]) {
        if (old !== undefined) await deps.deleteSnapshot(`${params.source}@${old}`).catch(() => undefined);
      }
    },
  };
}

async function copyPoint(p: BackupParams, deps: BackupDeps, ctx: JobContext, was: BackupState, createdBefore: boolean): Promise<boolean> {
  let created = createdBefore;
  const size = await deps.size(p.target);
  if (size === undefined) {
    await ctx.saveState({ phase: 'copy', created: true } satisfies BackupState);
    await deps.create(p.target, p.sizeBytes, p.owner);
    created = true;
  } else if (p.base !== undefined && p.previous !== undefined && was.reverted !== true) {
    // Only the changes go on top: the backup volume must hold the previous point exactly, whatever
    // happened to it since (a mount that replayed a journal, an earlier run that could not undo).
    await deps.revert(`${p.target}@${pointName(p.previous)}`);
    await ctx.saveState({ phase: 'copy', created, reverted: true } satisfies BackupState);
  }
  const now = await deps.size(p.target);
  if (now !== undefined && now < p.sizeBytes) await deps.resize(p.target, p.sizeBytes);
  const from = `${p.source}@${p.marker}`;
  const only = p.base !== undefined ? await deps.changes(from, p.base) : undefined;
  const src = await deps.open(from, 'r');
  try {
    const dst = await deps.open(p.target, 'rw');
    try {
      // A backup volume this job made reads as zeros where nothing was written; one made before
      // holds the previous point, which everything outside the changes still equals.
      await copyData(src, dst, ctx, {
        targetFresh: created && only === undefined, ...(only ? { only } : {}), state: { phase: 'copy', created, reverted: true } satisfies BackupState,
      });
      // A backup volume larger than this point (the source shrank since an earlier one) reads
      // zeros past the point's end, so that a restore or a later point never sees stale data.
      const STEP = 64 * 1024 * 1024;
      for (let off = src.sizeBytes; off < dst.sizeBytes; off += STEP) {
        const n = Math.min(STEP, dst.sizeBytes - off);
        await (dst.writeZeroes ? dst.writeZeroes(off, n) : dst.write(off, new Uint8Array(n)));
      }
      if (dst.sizeBytes > src.sizeBytes) await dst.flush();
    } finally {
      await dst.close();
    }
  } finally {
    await src.close();
  }
  await ctx.saveState({ phase: 'point', created } satisfies BackupState);
  return created;
}

/** After a failure: the backup volume as it was (the previous point), and no new marker. */
async function undo(p: BackupParams, deps: BackupDeps, created: boolean): Promise<void> {
  if (created) await deps.remove(p.target).catch(() => undefined);
  else if (p.previous !== undefined) await deps.revert(`${p.target}@${pointName(p.previous)}`).catch(() => undefined);
  await deps.deleteSnapshot(`${p.source}@${p.marker}`).catch(() => undefined);
}
