import type { BlockDevice } from '../backend/block-device.js';
import type { JobContext, JobTask } from '../jobs/job-task.js';
import { Cancelled, FailedPrecondition, toOffloadError } from '../model/errors.js';
import { closeAfter, holdsLease, Shutdown } from '../jobs/job-run.js';
import { DEFAULT_GRANULARITY } from './dirty-map.js';
import { Fill, type FillState } from './fill.js';

/** One clone of an instant clone job. */
export interface FillPair {
  /** A volume or snapshot: read only. */
  source: string;
  /** The clone, created by the job's first run. */
  target: string;
  sizeBytes: number;
  owner: string;
}

export interface FillParams {
  /** Keep what clients read from the sources (copy-on-read). */
  copyOnRead?: boolean;
  /** The clones made together (the disks of one VM): created at once, filled by one job. */
  pairs: FillPair[];
}

/** One clone's part of the record: what is pending, and how much there was to copy at the start (for the progress). */
export interface FillRecord extends FillState {
  total: number;
}

/** The job's record: one FillRecord per pair, in the params' order. */
export interface FillJobRecord {
  fills: FillRecord[];
}

/** The broker's side of one pair. */
export interface FillPairDeps {
  openSource(): Promise<BlockDevice>;
  /** First run: create the target (sizeBytes, owner). */
  createTarget(): Promise<void>;
  openTarget(): Promise<BlockDevice>;
  /** Exports of the target may use the fill from now on (Fill.view). */
  register(fill: Fill, jobId: string): void;
  /** The job ends: `error` undefined once the target holds everything. */
  unregister(error?: unknown): void;
  /** Cancelled: the clone is abandoned; stop the target's exports and delete it (if this run or an earlier one created it). */
  abandon(): Promise<void>;
  /** Failed part-way: stop the target's exports (its data is incomplete without the fill). */
  stopExports(): Promise<void>;
}

/** Saved at most this often while filling (and whenever a client's write needs it): a kill loses at most this much copying. */
const SAVE_EVERY_MS = 250;
const CHUNK = 1 << 20;

/**
 * An instant clone as a job (type `fill`): each target exists and can be served from the first
 * moment (reads of what is not filled yet come from its source), and this job fills them in the
 * background, resuming after a restart from its record of what is still pending — never copying
 * again what was recorded filled, never copying over what a client wrote (core/live/fill.ts).
 * Several pairs share one record, written one save at a time with the latest flushed state of
 * each (a save never takes a pair's record back).
 */
export function fillTask(params: FillParams, deps: FillPairDeps[]): JobTask {
  return {
    type: 'fill',
    params: { ...params },
    async run(ctx: JobContext) {
      const saved = ctx.resumeFrom as FillJobRecord | undefined;
      const fills: Fill[] = [];
      const opened: BlockDevice[] = [];
      /** Targets this run created before the first record: nothing but this run knows of them. */
      let createdUnrecorded = 0;
      try {
        const records: FillRecord[] = [];
        for (let i = 0; i < params.pairs.length; i++) {
          const d = deps[i]!;
          const source = await d.openSource();
          opened.push(source);
          if (!saved) {
            await d.createTarget();
            createdUnrecorded++;
          }
          const target = await d.openTarget();
          opened.push(target);
          records.push(saved?.fills[i] ?? await pendingOf(source, target));
        }
        // What is pending is recorded before anything may use a target.
        if (!saved) await ctx.saveState({ fills: records } satisfies FillJobRecord);
        createdUnrecorded = 0;
        const latest = records.map((r) => ({ granularity: r.granularity, pending: r.pending }) as FillState);
        let writes = Promise.resolve();
        const persist = (i: number) => async (st: FillState) => {
          latest[i] = st;
          const write = writes.then(() => ctx.saveState({ fills: latest.map((l, j) => ({ ...l, total: records[j]!.total })) } satisfies FillJobRecord) ?? Promise.resolve());
          writes = write.catch(() => undefined);
          await write;
        };
        for (let i = 0; i < params.pairs.length; i++) {
          fills.push(new Fill(opened[2 * i]!, opened[2 * i + 1]!, records[i]!, persist(i), params.copyOnRead === true));
          deps[i]!.register(fills[i]!, ctx.jobId);
        }
        opened.length = 0; // the fills own the devices now
        const total = records.reduce((n, r) => n + r.total, 0);
        const progress = () => ctx.setProgress(total - fills.reduce((n, f) => n + f.pending.dirtyBytes, 0), total);
        progress();
        let lastSave = Date.now();
        for (const fill of fills) {
          for (let r = fill.pending.next(0, CHUNK); r; r = fill.pending.next(r.offset + r.length, CHUNK)) {
            const n = await fill.fillRange(r, () => ctx.checkLease());
            progress();
            // Saved before the speed limit's wait, so that a kill during it loses nothing copied.
            if (Date.now() - lastSave >= SAVE_EVERY_MS) {
              ctx.checkLease(); // a save flushes the target first
              await fill.save();
              lastSave = Date.now();
            }
            await ctx.checkpoint(n);
          }
          ctx.checkLease();
          await fill.save();
        }
        for (const fill of fills) await fill.detachSource();
        for (const d of deps) d.unregister();
      } catch (e) {
        const cancelled = e instanceof Cancelled || ctx.signal.reason instanceof Cancelled;
        // Another runner holds the job (its lease ran out, whatever else ended this run): the
        // target and its record are that runner's; nothing is saved, flushed or deleted here.
        const held = holdsLease(ctx);
        // Stopped for a resume (the broker closing) or failed: keep what was filled.
        if (!cancelled && held) for (const fill of fills) await fill.save().catch(() => undefined);
        // The exports first, while their views still serve (their clients see a clean end); then
        // every other view (a volumes.open) answers why, rather than reading devices going away.
        for (const d of deps) await d.stopExports().catch(() => undefined);
        const why = cancelled ? 'the instant clone was cancelled: this volume is deleted'
          : e instanceof Shutdown || ctx.signal.reason instanceof Shutdown ? 'the broker stopped: the fill goes on when it starts again; open the volume then'
            : `the instant clone's fill failed (${toOffloadError(e).message}): the clone is incomplete; delete it and clone again`;
        for (const fill of fills) fill.end(new FailedPrecondition(why));
        for (const d of deps) d.unregister(e);
        for (const dev of opened) await dev.close().catch(() => undefined);
        for (const [i, d] of deps.entries()) {
          // A first run that failed before its record leaves no half-made clone behind.
          if ((cancelled && held) || i < createdUnrecorded) await d.abandon().catch(() => undefined);
        }
        throw e;
      } finally {
        for (const fill of fills) await fill.release(closeAfter(ctx));
      }
    },
  };
}

/** A new target's record: what its source has allocated is pending; the rest reads as zeros already. */
async function pendingOf(source: BlockDevice, target: BlockDevice): Promise<FillRecord> {
  const f = new Fill(source, target, { granularity: DEFAULT_GRANULARITY, pending: [] }, async () => undefined);
  for (const e of await source.extents(0, source.sizeBytes)) if (e.kind === 'data') f.pending.mark(e.offset, e.length);
  return { granularity: DEFAULT_GRANULARITY, pending: f.pending.ranges().map((r) => [r.offset, r.length]), total: f.pending.dirtyBytes };
}
