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
import { closeAfter, leftForNextRun } from '../jobs/job-run.js';
import { Cancelled, errorFromCode, FailedPrecondition, toOffloadError, type OffloadError } from '../model/errors.js';
import type { JobContext, JobTask } from '../jobs/job-task.js';
import { partContexts } from '../jobs/part-contexts.js';
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

/** One backup run of several volumes (the disks of one VM, their markers taken at one instant): points all or none. */
export interface BackupGroupParams extends Record<string, unknown> {
  pairs: BackupParams[];
}

/** Saved with each checkpoint (the copier adds its `offset`); a group saves one per pair (core/jobs/part-contexts.ts). */
interface BackupState { phase?: 'copy' | 'point' | 'tidy' | 'undo'; created?: boolean; reverted?: boolean }

export const pointName = (n: number): string => `b${n}`;

/** The pairs of a backup job's params: a group's, or the one of a single backup. */
export function backupPairs(params: BackupParams | BackupGroupParams): BackupParams[] {
  return Array.isArray(params.pairs) ? (params as BackupGroupParams).pairs : [params as BackupParams];
}

/**
 * A backup job: one pair (its params are the pair's), or a group, whose pairs are copied at once
 * and pointed together — a failure of any puts every backup volume back and drops every
 * new marker, so that the points a group leaves are always of the same instant.
 */
export function backupTask(params: BackupParams | BackupGroupParams, deps: BackupDeps): JobTask {
  const pairs = backupPairs(params);
  return {
    type: 'backup',
    params,
    async run(ctx) {
      const parts = Array.isArray(params.pairs) ? partContexts(ctx, pairs.length) : [ctx];
      const was = parts.map((c) => (c.resumeFrom ?? {}) as BackupState);
      const created = was.map((w) => w.created === true);
      /** Undo every pair; what could not be removed, said in the error the job ends with (`cause`'s, else its own). */
      const undoAll = async (cause?: unknown): Promise<OffloadError> => {
        const left: string[] = [];
        for (const [i, p] of pairs.entries()) {
          await undo(p, deps, created[i]!).catch((e: unknown) => left.push(`${p.target} (${toOffloadError(e).message})`));
        }
        const base = cause !== undefined ? toOffloadError(cause) : new FailedPrecondition(`the backup point${pairs.length > 1 ? 's' : ''} ${pairs.map((p) => `${pointName(p.point)} of ${p.source}`).join(', ')} failed and ${pairs.length > 1 ? 'were' : 'was'} undone; back up again`, {
          ref: pairs.map((p) => p.target).join(','),
        });
        if (left.length === 0) return base;
        return errorFromCode(base.code, `${base.message}; undoing it, the backup volume${left.length > 1 ? 's' : ''} it made could not be removed: ${left.join(', ')}`, {
          ref: base.ref ?? pairs.map((p) => p.target).join(','), hint: 'delete them (they hold no point of a finished backup), then back up again', data: { leftover: true },
        });
      };
      if (was.some((w) => w.phase === 'undo')) {
        // Stopped while putting the backup volumes back: finish that, and end as failed.
        throw await undoAll();
      }
      try {
        // The disks are copied at once (their sources and targets are as many devices); the
        // first to fail stops the others at their next checkpoint, before anything is undone.
        const toCopy = pairs.flatMap((_, i) => (was[i]!.phase === undefined || was[i]!.phase === 'copy' ? [i] : []));
        await allOrNone(toCopy, (i, halting) => copyPoint(pairs[i]!, deps, halting(parts[i]!), was[i]!, created[i]!, () => (created[i] = true)));
        for (const [i, p] of pairs.entries()) {
          if (was[i]!.phase === 'tidy') continue;
          await deps.snapshot(`${p.target}@${pointName(p.point)}`);
          await parts[i]!.saveState({ phase: 'tidy', ...(created[i] ? { created: true } : {}) } satisfies BackupState);
        }
      } catch (e) {
        if (!leftForNextRun(e, ctx)) {
          // Recorded first (one pair's undo is the group's): a kill while undoing must not resume the copy over an undone volume.
          for (const [i, c] of parts.entries()) await Promise.resolve(c.saveState({ phase: 'undo', created: created[i]! } satisfies BackupState)).catch(() => undefined);
          const after = await undoAll(e);
          if (after !== e && after.message !== toOffloadError(e).message) throw after;
        }
        throw e;
      }
      // Every point exists: the previous markers have served their purpose.
      for (const p of pairs) {
        for (const old of [p.base, p.previousMarker]) {
          if (old !== undefined) await deps.deleteSnapshot(`${p.source}@${old}`).catch(() => undefined);
        }
      }
    },
  };
}

/** How many disks of a group are copied at once, at most. */
const GROUP_COPIES = 4;

/**
 * Run `copy` for every index, GROUP_COPIES at once; once one fails, the others stop at their next
 * checkpoint (their context, made by `halting`, throws there) and no more start; resolves when all
 * have ended, rejects with the first failure. Every copy has ended when it settles.
 */
async function allOrNone(indices: number[], copy: (i: number, halting: (ctx: JobContext) => JobContext) => Promise<void>): Promise<void> {
  let failure: { error: unknown } | undefined;
  const halting = (ctx: JobContext): JobContext => {
    const stopIfFailed = () => {
      if (failure) throw new Cancelled('another disk of the group failed');
    };
    // The part's own context, stopping at each checkpoint once another failed.
    return {
      jobId: ctx.jobId,
      signal: ctx.signal,
      resumeFrom: ctx.resumeFrom,
      leaseUntil: ctx.leaseUntil,
      get speed() {
        return ctx.speed;
      },
      get completeRequested() {
        return ctx.completeRequested;
      },
      setTotal: (bytes) => ctx.setTotal(bytes),
      advance: (bytes) => ctx.advance(bytes),
      setProgress: (current, total) => ctx.setProgress(current, total),
      checkpoint: (bytes, state) => {
        stopIfFailed();
        return ctx.checkpoint(bytes, state);
      },
      pace: (bytes) => {
        stopIfFailed();
        return ctx.pace ? ctx.pace(bytes) : ctx.checkpoint(bytes);
      },
      saveState: (state) => ctx.saveState(state),
      beforeSave: (fn) => ctx.beforeSave(fn),
      ready: () => ctx.ready(),
      waitForComplete: () => ctx.waitForComplete(),
      confirmLease: () => ctx.confirmLease(),
      checkLease: () => ctx.checkLease(),
    };
  };
  let next = 0;
  const worker = async (): Promise<void> => {
    while (failure === undefined && next < indices.length) {
      const i = indices[next++]!;
      try {
        await copy(i, halting);
      } catch (e) {
        failure ??= { error: e };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(GROUP_COPIES, indices.length) }, worker));
  if (failure) throw failure.error;
}

async function copyPoint(p: BackupParams, deps: BackupDeps, ctx: JobContext, was: BackupState, createdBefore: boolean, onCreated: () => void): Promise<void> {
  let created = createdBefore;
  const size = await deps.size(p.target);
  if (size === undefined) {
    await ctx.saveState({ phase: 'copy', created: true } satisfies BackupState);
    onCreated();
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
        ctx.checkLease();
        await (dst.writeZeroes ? dst.writeZeroes(off, n) : dst.write(off, new Uint8Array(n)));
      }
      if (dst.sizeBytes > src.sizeBytes) await dst.flush();
    } finally {
      await dst.close(closeAfter(ctx));
    }
  } finally {
    await src.close();
  }
  await ctx.saveState({ phase: 'point', created } satisfies BackupState);
}

/** After a failure: the backup volume as it was (the previous point, without this one), and no new marker. */
async function undo(p: BackupParams, deps: BackupDeps, created: boolean): Promise<void> {
  // The point first: an array may refuse to delete a volume that has snapshots (FlashArray does).
  await deps.deleteSnapshot(`${p.target}@${pointName(p.point)}`).catch(() => undefined);
  if (created) await deps.remove(p.target);
  else if (p.previous !== undefined) await deps.revert(`${p.target}@${pointName(p.previous)}`).catch(() => undefined);
  await deps.deleteSnapshot(`${p.source}@${p.marker}`).catch(() => undefined);
}
