import type { BlockDevice } from '../backend/block-device.js';
import type { Unresumable } from '../jobs/job-manager.js';
import type { JobContext, JobTask } from '../jobs/job-task.js';
import type { JobRecord } from '../state/records.js';
import type { LiveDevice } from './live-device.js';
import { Mirror, type MirrorMode } from './mirror.js';

export interface MirrorParams {
  /** The volume in use (its export's device is `source`). */
  source: string;
  target: string;
  mode: MirrorMode;
  /** The target did not exist: the job creates it (and deletes it again if it ends before ready). */
  create?: { sizeBytes: number; owner: string };
}

/** Which side holds the data, as the job's saved state says: written before the export switches. */
export interface MirrorState {
  authoritative: 'source' | 'target';
}

/** What the export needs to serve the target, taken before the switch-over. */
export interface Switch {
  /** After the switch: the export serves the target; release the source (`old` is its device). */
  done(old: BlockDevice): Promise<void>;
  /** The switch did not happen: give back what was taken. */
  undo(): Promise<void>;
}

export interface MirrorDeps {
  /** The device the source's export serves. */
  source: LiveDevice;
  /** The job starts: the export is under it from now on (`cancel` ends it cleanly). */
  attach(jobId: string): void;
  /** The job ends, switched over or not. */
  detach(): void;
  /** Open the target for writing; `create` (params.create): make it first. */
  openTarget(create: MirrorParams['create']): Promise<BlockDevice>;
  /** Before the switch-over (clients still on the source): take what the export needs to serve the target. */
  prepareSwitch(jobId: string): Promise<Switch>;
  /** The job ended before ready having created the target: delete it. */
  removeTarget(): Promise<void>;
  /** The record of the authoritative side cannot be made true again: stop serving (not awaited). */
  failClosed(why: unknown): void;
}

/**
 * A live copy as a job (QEMU's mirror job, block/mirror.c, with its job states): running while
 * the bulk pass copies, `ready` once the target is in sync, and in sync while writes go on. On
 * `complete` it pivots: the saved state says, durably and before the export switches, that the
 * target is now authoritative. Cancelled after ready, the target is left a consistent
 * point-in-time copy; before, it is left as it is, or deleted if the job created it.
 */
export function mirrorTask(params: MirrorParams, deps: MirrorDeps): JobTask {
  return {
    type: 'mirror',
    params: { ...params },
    async run(ctx: JobContext) {
      await ctx.saveState({ authoritative: 'source' } satisfies MirrorState);
      deps.attach(ctx.jobId);
      let target: BlockDevice | undefined;
      let created = false;
      let pivoted = false;
      let mirror: Mirror | undefined;
      try {
        target = await deps.openTarget(params.create);
        created = params.create !== undefined;
        mirror = new Mirror(deps.source, target, {
          mode: params.mode,
          onProgress: ({ copied, dirty }) => ctx.setProgress(copied, copied + dirty),
          // The speed limit, pause and cancel, between copies.
          throttle: (bytes) => ctx.checkpoint(bytes),
        });
        await mirror.start();
        await untilAborted(mirror.whenReady(), ctx.signal);
        ctx.ready();
        await ctx.waitForComplete();
        const sw = await deps.prepareSwitch(ctx.jobId);
        let old: BlockDevice;
        try {
          old = await mirror.pivot(() => ctx.saveState({ authoritative: 'target' } satisfies MirrorState) ?? Promise.resolve());
        } catch (e) {
          await sw.undo();
          // The record may say target (a write that failed after it committed) while the source is
          // still served: say source again, or stop serving rather than leave the two apart.
          try {
            await ctx.saveState({ authoritative: 'source' } satisfies MirrorState);
          } catch (again) {
            deps.failClosed(again);
          }
          throw e;
        }
        pivoted = true;
        await sw.done(old);
      } catch (e) {
        if (!pivoted) await mirror?.stop({ consistent: mirror.ready }).catch(() => undefined);
        throw e;
      } finally {
        deps.detach();
        if (!pivoted) await target?.close().catch(() => undefined);
        if (!pivoted && created && !mirror?.ready) await deps.removeTarget().catch(() => undefined);
      }
    },
  };
}

/** `p`, or the signal's reason once it aborts. */
function untilAborted<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise<T>((resolve, reject) => {
    const abort = () => reject(signal.reason);
    signal.addEventListener('abort', abort, { once: true });
    p.then(resolve, reject).finally(() => signal.removeEventListener('abort', abort));
  });
}

/**
 * A mirror job whose runner stopped is not resumed (its export went with that process): what its
 * record says instead — which side holds the data, and why.
 */
export function mirrorAfterRestart(rec: JobRecord): Unresumable {
  const p = rec.params as unknown as MirrorParams;
  const side = (rec.checkpoint as MirrorState | undefined)?.authoritative ?? 'source';
  if (side === 'target') {
    return { succeeded: true, why: `the switch-over had been recorded: ${p.target} holds the data, ${p.source} is no longer current` };
  }
  const made = p.create ? `; ${p.target} was created by this job and is not a copy of anything: delete it` : `; ${p.target} is behind`;
  return { why: `the switch-over had not been recorded: ${p.source} holds the data and stays current${made}` };
}
