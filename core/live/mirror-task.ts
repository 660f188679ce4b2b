import type { BlockDevice } from '../backend/block-device.js';
import type { JobContext, JobTask } from '../jobs/job-task.js';
import type { LiveDevice } from './live-device.js';
import { Mirror, type MirrorMode } from './mirror.js';

export interface MirrorParams {
  /** The volume in use (its export's device is `source`). */
  source: string;
  target: string;
  mode: MirrorMode;
}

/** Which side holds the data, as the job's saved state says: written before the export switches. */
export interface MirrorState {
  authoritative: 'source' | 'target';
}

export interface MirrorDeps {
  /** The device the source's export serves. */
  source: LiveDevice;
  /** Open the target for writing (created by the caller if the job makes it). */
  openTarget(): Promise<BlockDevice>;
  /** After the pivot: the export serves the target; close the source's device and release it. */
  pivoted(old: BlockDevice): Promise<void>;
}

/**
 * A live copy as a job (QEMU's mirror job, block/mirror.c, with its job states): running while
 * the bulk pass copies, `ready` once the target is in sync, and in sync while writes go on. On
 * `complete` it pivots: the saved state says, durably and before the export switches, that the
 * target is now authoritative. Cancelled after ready, the target is left a consistent
 * point-in-time copy; before, it is left as it is (the caller removes a target it created).
 */
export function mirrorTask(params: MirrorParams, deps: MirrorDeps): JobTask {
  return {
    type: 'mirror',
    params: { ...params },
    async run(ctx: JobContext) {
      await ctx.saveState({ authoritative: 'source' } satisfies MirrorState);
      const target = await deps.openTarget();
      let pivoted = false;
      const mirror = new Mirror(deps.source, target, {
        mode: params.mode,
        onProgress: ({ copied, dirty }) => ctx.setProgress(copied, copied + dirty),
        // The speed limit, pause and cancel, between copies.
        throttle: (bytes) => ctx.checkpoint(bytes),
      });
      try {
        await mirror.start();
        await untilAborted(mirror.whenReady(), ctx.signal);
        ctx.ready();
        await ctx.waitForComplete();
        const old = await mirror.pivot(() => ctx.saveState({ authoritative: 'target' } satisfies MirrorState) ?? Promise.resolve());
        pivoted = true;
        await deps.pivoted(old);
      } catch (e) {
        if (!pivoted) await mirror.stop({ consistent: mirror.ready }).catch(() => undefined);
        throw e;
      } finally {
        if (!pivoted) await target.close().catch(() => undefined);
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
