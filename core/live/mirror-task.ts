import type { BlockDevice, ByteRange } from '../backend/block-device.js';
import type { StoppedRunner, Unresumable } from '../jobs/job-manager.js';
import type { JobContext, JobTask } from '../jobs/job-task.js';
import type { JobRecord } from '../state/records.js';
import type { StateOps } from '../state/state-store.js';
import type { LiveDevice } from './live-device.js';
import { Mirror, type MirrorMode } from './mirror.js';
import { IntentLog, type IntentRecord, type PairIds } from './write-intent.js';
import { Busy, Cancelled } from '../model/errors.js';
import { holdsLease, LeaseLost } from '../jobs/job-run.js';

/** One disk of a live copy: the volume in use (its export's device is the pair's `source` dep) and its copy. */
export interface MirrorPair {
  source: string;
  target: string;
  /** The target did not exist: the job creates it (and deletes it again if it ends before ready). */
  create?: { sizeBytes: number; owner: string };
  /** A resumed copy whose earlier job created the target: deleted as `create`'s is if this job ends before ready. */
  made?: true;
  /** The target equals the source's snapshot of this name already: the first pass copies only what changed since. */
  since?: string;
  /**
   * With `since`: where the target was still behind the snapshot (a copy suspended before ready),
   * copied as well. Without: the target equals the source but here (a copy resumed after a crash,
   * from its write-intent record).
   */
  pending?: ByteRange[];
}

export interface MirrorParams {
  mode: MirrorMode;
  /** The disks copied together: ready when all are, switched over all or none. */
  pairs: MirrorPair[];
}

/** Which side holds the data, as the job's saved state says: written before the exports switch (one record for every pair). */
export interface MirrorState {
  authoritative: 'source' | 'target';
  /**
   * Cancelled after ready: per pair, the snapshot of the source that the target equals (taken
   * while the clients were held), from which `copy --live --since` resumes; null where none could be taken.
   */
  points?: (string | null)[];
  /**
   * Suspended with its service (which resumes it as a new job when it starts again): per pair,
   * what the target was still behind on at its point (`points` are all set).
   */
  pending?: ByteRange[][];
  /**
   * While it copies: per pair, the write-intent record (write-intent.ts) — every region where the
   * target may differ from the source; a copy whose service died goes on from it.
   */
  intent?: IntentRecord[];
  /** Resumed (from its points or its write-intent record) as this job: not the way on any more. */
  resumedBy?: string;
}

/** What an export needs to serve its target, taken before the switch-over. */
export interface Switch {
  /** After the switch: the export serves the target; release the source (`old` is its device). */
  done(old: BlockDevice): Promise<void>;
  /** The switch did not happen: give back what was taken. */
  undo(): Promise<void>;
}

/** The broker's side of one pair. */
export interface MirrorPairDeps {
  /** The device the source's export serves. */
  source: LiveDevice;
  /** The job starts: the export is under it from now on (`cancel` ends it cleanly). */
  attach(jobId: string): void;
  /** The job ends, switched over or not. */
  detach(): void;
  /** Open the target for writing; `create` (the pair's): make it first. */
  openTarget(create: MirrorPair['create']): Promise<BlockDevice>;
  /** The ids of the source and the (open) target, where their backends give them (Volume.id). */
  identify(): Promise<PairIds>;
  /** Before the switch-over (clients still on the source): take what the export needs to serve the target. */
  prepareSwitch(jobId: string): Promise<Switch>;
  /** The job ended before ready having created the target: delete it. */
  removeTarget(): Promise<void>;
  /** What changed in the source since its snapshot `since` (a resumed copy's first pass). */
  changesSince(since: string): Promise<ByteRange[]>;
  /**
   * With the clients held and the target in sync: snapshot the source, naming the point the
   * target equals (undefined: its backend cannot say later what changed since, so no resume).
   */
  markPoint(jobId: string): Promise<string | undefined>;
  /** A snapshot of the source this job no longer needs (the point it resumed from). */
  dropSnapshot(name: string): Promise<void>;
}

export interface MirrorDeps {
  /** One per pair, in the params' order. */
  pairs: MirrorPairDeps[];
  /** The record of the authoritative side cannot be made true again: stop serving (not awaited). */
  failClosed(why: unknown): void;
  /** True while the service stops and will resume its live copies when it starts again: a cancel then suspends. */
  suspending?(): boolean;
  /** Take the write-intent record out of the job's record (when the record that ends the job could not be written). */
  dropIntent(jobId: string): Promise<void>;
  /** Told what went wrong where nobody waits for it. */
  warn?(message: string): void;
  /** How often the write-intent record lets go of regions in sync (ms), once ready and before (default TRIM_EVERY_MS, BULK_TRIM_EVERY_MS). */
  trimEveryMs?: { ready: number; bulk: number };
}

/**
 * How often the write-intent record of a ready copy lets go of regions in sync (ms): after a
 * crash, the copy goes on from what it had copied up to about twice this long before, and copies
 * again what was written then. Each trim flushes the target (and the source where the guest wrote),
 * and each region that leaves costs the guest's next write there a (synced) save of the record:
 * bench/live.ts --hold 15, 3 rounds, random 4 KiB writes at 200/s over 1 GiB while ready — trims
 * every second, write p50 0.76 / 0.78 ms (background / write-blocking) against baselines of
 * 0.35 / 0.37; every 4 s, 0.54 / 0.57 against 0.34 / 0.30 (the code before the source flush and
 * the synced saves: 0.62 / 0.57 against 0.43 / 0.39, trims every second).
 */
const TRIM_EVERY_MS = 4000;
/**
 * The same before the mirrors are ready. Each trim flushes the targets, and a write-blocking
 * write into a target waits behind that flush: bench/live.ts, 5 rounds, trims every second during
 * the copy, write-blocking rounds with a p99 of 16–20 ms against baselines of 1.5–3 ms (the
 * code before: 2.3–3.3 ms in the quiet rounds). A kill in the bulk pass then copies again up to
 * about twice this much of the copy.
 */
const BULK_TRIM_EVERY_MS = 4000;
/** How often a job's record is asked again to drop its write intent after the job ended without (ms). */
const INTENT_RETRY_MS = 5000;

/** How often a mirror job's progress is reported while it copies (ms). */
const PROGRESS_EVERY_MS = 100;

/**
 * A live copy as a job (QEMU's mirror job, block/mirror.c, with its job states): running while
 * the bulk passes copy, `ready` once every target is in sync, and in sync while writes go on. On
 * `complete` it pivots every pair at once: the sources are held, the targets brought in sync and
 * flushed, the saved state says — once, durably, before any export switches — that the targets
 * are now authoritative, then every export switches. Cancelled after ready, the targets are left
 * consistent point-in-time copies; before, as they are, or deleted where the job created them.
 */
export function mirrorTask(params: MirrorParams, deps: MirrorDeps): JobTask {
  return {
    type: 'mirror',
    params: { ...params },
    async run(ctx: JobContext) {
      const n = params.pairs.length;
      // Every state goes through here: whether the job's stored record may still name a write
      // intent (until a state without one is saved). What the job concludes with is the last
      // state asked for, saved or not.
      let intentRecorded = false;
      const save = async (state: MirrorState) => {
        if (state.intent !== undefined) intentRecorded = true;
        await ctx.saveState(state);
        intentRecorded = state.intent !== undefined;
      };
      // The write-intent record: at first everything may differ; each trim lets go of what is in sync.
      const log = new IntentLog((intent) => save({ authoritative: 'source', intent }), () => deps.dropIntent(ctx.jobId));
      const intents = deps.pairs.map((d) => log.add(d.source.sizeBytes, 'all'));
      const unguard: (() => void)[] = [];
      // Once the record names no intent (a last record, or, failing it, the intent dropped — maybe
      // only by a later write that asks again), the guards go.
      log.onFree = () => { for (const u of unguard.splice(0)) u(); };
      let trimmer: NodeJS.Timeout | undefined;
      for (const d of deps.pairs) d.attach(ctx.jobId);
      const targets: (BlockDevice | undefined)[] = new Array(n);
      const created: boolean[] = new Array(n).fill(false);
      const mirrors: Mirror[] = [];
      const copied = new Array<number>(n).fill(0);
      const dirty = new Array<number>(n).fill(0);
      const sum = (a: number[]) => a.reduce((x, y) => x + y, 0);
      // The job's progress (an event with a copy of its record) at most every PROGRESS_EVERY_MS, not
      // per copied MiB: that was ~3 % of the serving thread during a copy at full speed.
      let reported = 0;
      // One report after a skipped one, so that the last copies before a quiet spell are shown.
      let trailing: NodeJS.Timeout | undefined;
      const report = (force: boolean) => {
        const now = Date.now();
        if (!force && now - reported < PROGRESS_EVERY_MS) {
          trailing ??= setTimeout(() => {
            trailing = undefined;
            report(true);
          }, PROGRESS_EVERY_MS - (now - reported)).unref();
          return;
        }
        clearTimeout(trailing);
        trailing = undefined;
        reported = now;
        ctx.setProgress(sum(copied), sum(copied) + sum(dirty));
      };
      let pivoted = false;
      let suspended = false;
      let started = 0;
      let refused: LeaseLost | undefined;
      try {
        // Within the try: if it fails, the record it may have left in the job is replaced at the end.
        await log.save();
        for (let i = 0; i < n; i++) {
          targets[i] = await deps.pairs[i]!.openTarget(params.pairs[i]!.create);
          created[i] = params.pairs[i]!.create !== undefined || params.pairs[i]!.made === true;
          // Before any region can leave the record (the trims start once every copy has).
          intents[i]!.volumes = await deps.pairs[i]!.identify();
          mirrors.push(new Mirror(deps.pairs[i]!.source, targets[i]!, {
            mode: params.mode,
            onProgress: (p) => {
              copied[i] = p.copied;
              dirty[i] = p.dirty;
              report(false);
            },
            // The speed limit, pause and cancel, between copies.
            // Not counted when let through: the progress is what the copies report (onProgress).
            throttle: (bytes) => (ctx.pace ? ctx.pace(bytes) : ctx.checkpoint(bytes)),
            mayWrite: () => ctx.checkLease(),
            intent: intents[i]!,
            ...firstPass(params.pairs[i]!, deps.pairs[i]!),
          }));
        }
        // Every write to a source is in the record before it lands; its mirror watches from the
        // same moment (start's first step, before anything is awaited): a resumed copy's held
        // writes, let go by the guard, are all seen.
        for (const [i, m] of mirrors.entries()) {
          unguard.push(deps.pairs[i]!.source.setGuard(intents[i]!));
          await m.start();
          started++;
        }
        const every = deps.trimEveryMs ?? { ready: TRIM_EVERY_MS, bulk: BULK_TRIM_EVERY_MS };
        let lastTrim = Date.now();
        trimmer = setInterval(() => {
          // A trim flushes the targets (their held metadata): not once the lease is gone.
          if (!holdsLease(ctx)) return;
          if (!mirrors.every((m) => m.ready) && Date.now() - lastTrim < every.bulk - every.ready / 2) return;
          lastTrim = Date.now();
          void log.trim(async (sources) => {
            await Promise.all(mirrors.flatMap((m, i) => (sources[i] ? [m.flushTarget(), m.flushSource()] : [m.flushTarget()])));
          }, (i, o, l) => !mirrors[i]!.isDirty(o, l)).catch(() => undefined);
        }, every.ready);
        trimmer.unref();
        await untilAborted(Promise.all(mirrors.map((m) => m.whenReady())), ctx.signal);
        report(true);
        ctx.ready();
        await ctx.waitForComplete();
        const switches: Switch[] = [];
        let old: BlockDevice[];
        clearInterval(trimmer);
        try {
          for (let i = 0; i < n; i++) switches.push(await deps.pairs[i]!.prepareSwitch(ctx.jobId));
          // The clients are held: no write waits for the record, and none lands before the switch.
          old = await Mirror.pivotAll(mirrors, () => log.close(() => save({ authoritative: 'target' })));
        } catch (e) {
          for (const sw of switches) await sw.undo().catch(() => undefined);
          // The record may say target (a write that failed after it committed) while the sources are
          // still served: say source again, or stop serving rather than leave the two apart.
          try {
            await save({ authoritative: 'source' });
          } catch (again) {
            deps.failClosed(again);
          }
          throw e;
        }
        pivoted = true;
        for (let i = 0; i < n; i++) await switches[i]!.done(old[i]!);
        await dropResumedFrom(params, deps);
      } catch (e) {
        // No trim once a mirror may stop watching: it would take a region written since for in sync.
        clearInterval(trimmer);
        // Another runner holds the job: the mirrors stop without a last copy or a point (their
        // targets are that runner's to write now).
        if (!pivoted && (e instanceof LeaseLost || ctx.signal.reason instanceof LeaseLost)) {
          await Promise.all(mirrors.map((m) => m.stop().catch(() => undefined)));
          throw e;
        }
        // Only mirrors that all started know what their targets lack (one stopped while starting is cancelled).
        if (!pivoted && deps.suspending?.() && started === n) suspended = await suspendAll(params, deps, mirrors, ctx, log, save);
        if (suspended) {
          throw new Cancelled(`stopped with its service, at a snapshot of ${n === 1 ? 'its source' : 'each source'}: the service resumes the copy as a new job when it starts again`, { data: { suspended: true } });
        }
        if (!pivoted) await stopAll(params, deps, mirrors, ctx, log, save);
        throw e;
      } finally {
        clearTimeout(trailing);
        clearInterval(trimmer);
        // The job ends: its record names no write intent (it concludes with it, so written through
        // the job, not only in the store). Failing that, the guards stay (log.onFree), and a write
        // where none was recorded fails until the intent can be dropped.
        await log.close(async () => {
          if (intentRecorded) await save({ authoritative: 'source' });
        }).catch((e: unknown) => {
          // Refused for the lease: the job's own record still names the intent, so it must not
          // conclude with it (the runner gives the job up; whoever takes it over drops it).
          if (e instanceof LeaseLost) refused = e;
          deps.warn?.(`live copy ${ctx.jobId}: its write-intent record could not be dropped (${(e as Error).message}); writes to its sources outside the regions it names fail until it can be`);
          // Tried again in the background too: a guest writing only where the record names never asks.
          const retry = setInterval(() => void log.save().then(() => clearInterval(retry), () => undefined), INTENT_RETRY_MS);
          retry.unref();
        });
        for (const d of deps.pairs) d.detach();
        if (!pivoted) {
          // A target this run made stays when another runner holds the job now: it copies into it.
          const handedOn = refused !== undefined || ctx.signal.reason instanceof LeaseLost;
          for (let i = 0; i < n; i++) {
            await targets[i]?.close(handedOn ? { writeNothing: true } : undefined).catch(() => undefined);
            if (created[i] && !mirrors[i]?.ready && !suspended && !handedOn) await deps.pairs[i]!.removeTarget().catch(() => undefined);
          }
        }
        // The lease's refusal, not the copy's error, says how the job ends: it is given up, not concluded.
        if (refused) throw refused;
      }
    },
  };
}

/**
 * Stop every mirror. Those that were ready leave their target a point-in-time copy and, where the
 * backend can, a snapshot of the source at that point, recorded for a resume.
 */
async function stopAll(params: MirrorParams, deps: MirrorDeps, mirrors: Mirror[], ctx: JobContext, log: IntentLog, save: (s: MirrorState) => Promise<void>): Promise<void> {
  const points: (string | null)[] = params.pairs.map(() => null);
  await Promise.all(mirrors.map(async (m, i) => {
    const atPoint = async () => {
      points[i] = (await deps.pairs[i]!.markPoint(ctx.jobId).catch(() => undefined)) ?? null;
    };
    await m.stop({ consistent: m.ready, atPoint }).catch(() => undefined);
  }));
  if (!points.some((p) => p !== null)) return;
  try {
    await log.close(() => save({ authoritative: 'source', points }));
  } catch {
    // Unrecorded: the points it resumed from stay the way back, and the new ones are of no use.
    for (const [i, p] of points.entries()) if (p !== null) await deps.pairs[i]!.dropSnapshot(p).catch(() => undefined);
    return;
  }
  // A pair with a new point no longer needs the one it resumed from; one without keeps it.
  for (let i = 0; i < params.pairs.length; i++) {
    const since = params.pairs[i]!.since;
    if (points[i] !== null && ownPoint(since)) await deps.pairs[i]!.dropSnapshot(since!).catch(() => undefined);
  }
}

/**
 * The service stops (a cancel while deps.suspending()): every mirror is suspended at a snapshot of
 * its source, and the points with what each target is still behind on are recorded, for the
 * service to resume the copy when it starts again. False (nothing suspended, the snapshots
 * dropped) when a source's backend cannot take such a point or the record cannot be saved: the
 * copy is then stopped as by a cancel.
 */
async function suspendAll(params: MirrorParams, deps: MirrorDeps, mirrors: Mirror[], ctx: JobContext, log: IntentLog, save: (s: MirrorState) => Promise<void>): Promise<boolean> {
  const points: (string | undefined)[] = params.pairs.map(() => undefined);
  const pending: ByteRange[][] = params.pairs.map(() => []);
  const results = await Promise.allSettled(mirrors.map(async (m, i) => {
    pending[i] = await m.suspend(async () => {
      points[i] = await deps.pairs[i]!.markPoint(ctx.jobId);
    });
  }));
  const drop = async () => {
    for (const [i, p] of points.entries()) if (p !== undefined) await deps.pairs[i]!.dropSnapshot(p).catch(() => undefined);
  };
  if (results.some((r) => r.status === 'rejected') || points.some((p) => p === undefined)) {
    await drop();
    return false;
  }
  try {
    await log.close(() => save({ authoritative: 'source', points: points as string[], pending }));
  } catch {
    await drop();
    return false;
  }
  // The new points replace those this job resumed from.
  for (let i = 0; i < params.pairs.length; i++) {
    const since = params.pairs[i]!.since;
    if (ownPoint(since)) await deps.pairs[i]!.dropSnapshot(since!).catch(() => undefined);
  }
  return true;
}

/**
 * What a pair's first pass copies: what changed since the snapshot it resumes from and where its
 * target was behind there; or, resumed after a crash, the regions its write-intent record named;
 * else (undefined) what the source allocates.
 */
function firstPass(pair: MirrorPair, deps: MirrorPairDeps): { initial?: () => Promise<ByteRange[]> } {
  if (pair.since !== undefined) return { initial: async () => [...await deps.changesSince(pair.since!), ...(pair.pending ?? [])] };
  if (pair.pending !== undefined) return { initial: async () => pair.pending! };
  return {};
}

/** The points this job resumed from have served: newer ones (or the switch-over) replace them. */
async function dropResumedFrom(params: MirrorParams, deps: MirrorDeps): Promise<void> {
  for (let i = 0; i < params.pairs.length; i++) {
    const since = params.pairs[i]!.since;
    if (ownPoint(since)) await deps.pairs[i]!.dropSnapshot(since!).catch(() => undefined);
  }
}

/**
 * Whether a point a copy resumed from is one a live copy made (`live-<job>`, dropped once it has
 * served): a snapshot the caller named (`--since nightly`) is the caller's, and stays.
 */
function ownPoint(since: string | undefined): boolean {
  return since !== undefined && since.startsWith('live-');
}

/** `p`, or the signal's reason once it aborts. */
function untilAborted<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) {
    p.catch(() => undefined); // its end is of no interest any more: not an unhandled rejection
    return Promise.reject(signal.reason);
  }
  return new Promise<T>((resolve, reject) => {
    const abort = () => reject(signal.reason);
    signal.addEventListener('abort', abort, { once: true });
    p.then(resolve, reject).finally(() => signal.removeEventListener('abort', abort));
  });
}

/**
 * A mirror job whose runner stopped is not resumed as it is (its export went with that process):
 * what its record says instead — which side holds the data, and why. Its write-intent record is
 * kept only when that process is known to have ended (`stopped.gone`): the service that serves
 * the source again then resumes the copy from it. A runner that may still be alive (paused past
 * its lease, on another host) may still let writes land, so the record is taken out.
 */
export function mirrorAfterRestart(rec: JobRecord, stopped: StoppedRunner): Unresumable {
  const { pairs } = rec.params as unknown as MirrorParams;
  const state = rec.checkpoint as MirrorState | undefined;
  const side = state?.authoritative ?? 'source';
  if (side === 'source' && state?.intent !== undefined) {
    const list = pairs.map((p) => p.source).join(', ');
    if (stopped.gone) {
      return { why: `the switch-over had not been recorded: ${list} hold${pairs.length === 1 ? 's' : ''} the data and stay${pairs.length === 1 ? 's' : ''} current; the copy goes on from its write-intent record when the service that served ${list} starts again` };
    }
    const { intent: _, ...rest } = state;
    return { ...mirrorAfterRestart({ ...rec, checkpoint: rest }, stopped), checkpoint: rest };
  }
  const list = (pick: (p: MirrorPair) => string) => pairs.map(pick).join(', ');
  if (side === 'target') {
    return { succeeded: true, why: `the switch-over had been recorded: ${list((p) => p.target)} hold${pairs.length === 1 ? 's' : ''} the data, ${list((p) => p.source)} no longer current` };
  }
  const made = pairs.filter((p) => p.create);
  const behind = made.length > 0 ? `; ${made.map((p) => p.target).join(', ')} ${made.length === 1 ? 'was' : 'were'} created by this job and ${made.length === 1 ? 'is' : 'are'} not a copy of anything: delete ${made.length === 1 ? 'it' : 'them'}` : `; ${list((p) => p.target)} ${pairs.length === 1 ? 'is' : 'are'} behind`;
  return { why: `the switch-over had not been recorded: ${list((p) => p.source)} hold${pairs.length === 1 ? 's' : ''} the data and stay${pairs.length === 1 ? 's' : ''} current${behind}` };
}

/**
 * Take the write-intent record out of a mirror job's record (MirrorDeps.dropIntent): the
 * checkpoint is swapped only while it is still the one read, so nothing the job writes is lost.
 */
export async function dropWriteIntent(store: Pick<StateOps, 'getJob' | 'replaceCheckpoint'>, jobId: string): Promise<void> {
  await changeState(store, jobId, (state) => {
    if (state?.intent === undefined) return undefined;
    const { intent: _, ...rest } = state;
    return rest;
  });
}

/**
 * Mark a concluded mirror job as resumed by `by` (its write-intent record dropped with it): its
 * points or record are the new job's way on now, and `jobs show` says so.
 */
export async function markResumed(store: Pick<StateOps, 'getJob' | 'replaceCheckpoint'>, jobId: string, by: string): Promise<void> {
  await changeState(store, jobId, (state) => {
    if (!state || state.resumedBy === by) return undefined;
    const { intent: _, ...rest } = state;
    return { ...rest, resumedBy: by };
  });
}

/** Swap a job's checkpoint for `change(it)` while it is still the one read (undefined: leave it). */
async function changeState(store: Pick<StateOps, 'getJob' | 'replaceCheckpoint'>, jobId: string, change: (s: MirrorState | undefined) => MirrorState | undefined): Promise<void> {
  for (let tries = 0; tries < 10; tries++) {
    const state = (await store.getJob(jobId))?.checkpoint as MirrorState | undefined;
    const next = change(state);
    if (next === undefined) return;
    if (await store.replaceCheckpoint(jobId, state, next)) return;
  }
  throw new Busy(`job ${jobId}'s record kept changing while it was being updated`);
}
