import type { BlockDevice } from '../backend/block-device.js';
import type { JobContext, JobTask } from '../jobs/job-task.js';
import { Cancelled } from '../model/errors.js';
import { DEFAULT_GRANULARITY } from './dirty-map.js';
import { Fill, type FillState } from './fill.js';

export interface FillParams {
  /** A volume or snapshot: read only. */
  source: string;
  /** The clone, created by the job's first run. */
  target: string;
  sizeBytes: number;
  owner: string;
}

/** The record of an instant clone: what is pending, and how much there was to copy at the start (for the progress). */
export interface FillRecord extends FillState {
  total: number;
}

export interface FillDeps {
  openSource(): Promise<BlockDevice>;
  /** First run: create the target (sizeBytes, owner). */
  createTarget(): Promise<void>;
  openTarget(): Promise<BlockDevice>;
  /** Exports of the target may use the fill from now on (Fill.view). */
  register(fill: Fill): void;
  /** The job ends: `error` undefined once the target holds everything. */
  unregister(error?: unknown): void;
  /** Cancelled: the clone is abandoned; stop the target's exports and delete it. */
  abandon(): Promise<void>;
  /** Failed part-way: stop the target's exports (its data is incomplete without the fill). */
  stopExports(): Promise<void>;
}

/** Saved at most this often while filling (and whenever a client's write needs it). */
const SAVE_EVERY_MS = 1000;
const CHUNK = 1 << 20;

/**
 * An instant clone as a job (type `fill`): the target exists and can be served from the first
 * moment (reads of what is not filled yet come from the source), and this job fills it in the
 * background, resuming after a restart from its record of what is still pending — never copying
 * again what was recorded filled, never copying over what a client wrote (core/live/fill.ts).
 */
export function fillTask(params: FillParams, deps: FillDeps): JobTask {
  return {
    type: 'fill',
    params: { ...params },
    async run(ctx: JobContext) {
      let record = ctx.resumeFrom as FillRecord | undefined;
      let fill: Fill | undefined;
      try {
        const source = await deps.openSource();
        let target: BlockDevice;
        try {
          if (!record) await deps.createTarget();
          target = await deps.openTarget();
        } catch (e) {
          await source.close().catch(() => undefined);
          throw e;
        }
        if (!record) {
          // What the source has allocated is what is pending; the rest reads as zeros on a new target.
          const extents = await source.extents(0, source.sizeBytes);
          const pending: [number, number][] = [];
          for (const e of extents) if (e.kind === 'data') pending.push([e.offset, e.length]);
          record = { granularity: DEFAULT_GRANULARITY, pending, total: 0 };
          const f = new Fill(source, target, record, async () => undefined);
          record = { granularity: DEFAULT_GRANULARITY, pending: f.pending.ranges().map((r) => [r.offset, r.length]), total: f.pending.dirtyBytes };
          await ctx.saveState(record);
        }
        const total = record.total;
        fill = new Fill(source, target, record, async (st) => { await ctx.saveState({ ...st, total } satisfies FillRecord); });
        deps.register(fill);
        const progress = () => ctx.setProgress(total - fill!.pending.dirtyBytes, total);
        progress();
        let lastSave = Date.now();
        for (let r = fill.pending.next(0, CHUNK); r; r = fill.pending.next(r.offset + r.length, CHUNK)) {
          const n = await fill.fillRange(r);
          progress();
          await ctx.checkpoint(n);
          if (Date.now() - lastSave >= SAVE_EVERY_MS) {
            await fill.save();
            lastSave = Date.now();
          }
        }
        await fill.save();
        await fill.detachSource();
        deps.unregister();
      } catch (e) {
        const cancelled = e instanceof Cancelled || ctx.signal.reason instanceof Cancelled;
        // Stopped for a resume (the broker closing) or failed: keep what was filled (a save is
        // fenced: a runner that lost the job writes nothing).
        if (!cancelled) await fill?.save().catch(() => undefined);
        deps.unregister(e);
        if (cancelled) await deps.abandon().catch(() => undefined);
        else await deps.stopExports().catch(() => undefined);
        throw e;
      } finally {
        await fill?.release();
      }
    },
  };
}
