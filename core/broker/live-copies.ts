/**
 * Live copy (`copy --live`): a copy of a volume a client writes to through this broker's export,
 * ending by switching that export over to the target (the mechanism: core/live/). It runs in the
 * broker that serves the export, because that is where the writes are seen.
 */
import type { BlockDevice, ByteRange } from '../backend/block-device.js';
import type { CopyOptions } from '../broker-api.js';
import type { Job } from '../jobs/job.js';
import type { ExportRecord, JobRecord } from '../state/records.js';
import { LiveDevice } from '../live/live-device.js';
import { dropWriteIntent, mirrorTask, type MirrorPair, type MirrorPairDeps, type MirrorParams, type MirrorState } from '../live/mirror-task.js';
import { Busy, FailedPrecondition, InternalError, InvalidArgument, NotFound, OutOfRange, toOffloadError } from '../model/errors.js';
import { parseVolumeRef, volumeKey } from '../model/refs.js';
import type { Plan } from '../planner/plan.js';
import type { Volume } from '../model/types.js';
import { ADMIN, type Principal } from '../locks/principal.js';
import type { Access } from './access.js';
import { holdExport } from './exports.js';
import { callExportHolder, GONE, type OpCall } from './op-calls.js';
import { checkSpeed, snapshotReaders } from './operation.js';
import { call, sinceName, type BrokerState } from './state.js';
import { checkIntentRecord, intentRanges, type IntentRecord } from '../live/write-intent.js';

/** The live copies of one principal's broker view. */
export class LiveCopies {
  constructor(private readonly s: BrokerState, private readonly a: Access) {}

  /**
   * The pairs and mode a live copy resumes with (LiveCopyOptions.resume): from the job `id`'s
   * record, each pair from the point it left (and, suspended, what its target was behind on).
   */
  async resumeOf(id: unknown, given: unknown): Promise<{ pairs: ResumedPair[]; mode: MirrorParams['mode']; owner: Principal; stale: string[]; crashed: boolean }> {
    if (typeof id !== 'string' || id.length === 0) throw new InvalidArgument('resume takes the id of a live copy (a mirror job)');
    const rec = await this.s.store.getJob(id);
    if (!rec || (!this.a.isAdmin && rec.owner !== this.a.principal.id)) throw new NotFound(`job ${id} does not exist`, { ref: id, hint: 'list jobs with `offload jobs list`' });
    if (rec.type !== 'mirror') throw new InvalidArgument(`job ${id} is a ${rec.type} job, not a live copy`, { ref: id });
    const params = rec.params as unknown as MirrorParams;
    const state = (rec.checkpoint ?? {}) as MirrorState;
    if (rec.status !== 'concluded') throw new FailedPrecondition(`live copy ${id} is ${rec.status}: only one that has ended can be resumed`, { ref: id });
    if (state.resumedBy !== undefined) {
      throw new FailedPrecondition(`live copy ${id} was resumed as job ${state.resumedBy}`, { ref: id, hint: `see \`offload jobs show ${state.resumedBy}\`, and resume that one if it has ended` });
    }
    // Its service died while it copied: it goes on from its write-intent record.
    const crashed = !rec.cancelled && state.authoritative === 'source' && Array.isArray(state.intent) && state.intent.length === params.pairs.length;
    if (!crashed && (state.authoritative !== 'source' || !Array.isArray(state.points) || state.points.length !== params.pairs.length || state.points.some((p) => typeof p !== 'string'))) {
      throw new FailedPrecondition(`live copy ${id} left no point to resume from (${state.authoritative === 'target' ? 'it switched over' : 'it ended before ready, or a source cannot take snapshots'})`, {
        ref: id, hint: 'start the copy again: `offload copy --live SRC DST`',
      });
    }
    if (crashed) await this.assertUnchangedSince(rec, params, state.intent!);
    const pairs = params.pairs.map((p, i): ResumedPair => {
      if (crashed) {
        const intent = checkIntentRecord(state.intent![i], (state.intent![i] as { sizeBytes?: number } | undefined)?.sizeBytes ?? -1, p.source);
        return { source: p.source, target: p.target, pending: intentRanges(intent), sizeBytes: intent.sizeBytes, ...madeBy(p) };
      }
      return { source: p.source, target: p.target, since: state.points![i]!, ...(Array.isArray(state.pending?.[i]) ? { pending: state.pending[i] } : {}), ...madeBy(p) };
    });
    if (Array.isArray(given) && given.length > 0) {
      const same = given.length === pairs.length && given.every((g: { source?: unknown; target?: unknown }, i) =>
        typeof g?.source === 'string' && typeof g?.target === 'string' && volumeKey(parseVolumeRef(g.source)) === pairs[i]!.source && volumeKey(parseVolumeRef(g.target)) === pairs[i]!.target);
      if (!same) throw new InvalidArgument(`live copy ${id} copied ${pairs.map((p) => `${p.source}=${p.target}`).join(' ')}: give no pairs, or the same`, { ref: id });
    }
    // Points the job resumed from itself and had not dropped yet (its runner stopped in between): not needed any more.
    // (Only points a live copy made: a snapshot its caller named is the caller's.)
    const stale = params.pairs.flatMap((p, i) => (p.since?.startsWith('live-') && (crashed || p.since !== state.points![i]) ? [`${p.source}@${p.since}`] : []));
    // Killed while it stopped or suspended, it may have taken its point and not recorded it.
    if (crashed) {
      for (const p of params.pairs) {
        if (this.s.backends.get(parseVolumeRef(p.source).backend)?.capabilities.hasAll('snapshot.create', 'data.dirty')) stale.push(`${p.source}@${pointName(id)}`);
      }
    }
    return { pairs, mode: params.mode, owner: { id: rec.owner, role: rec.ownerRole }, stale, crashed };
  }

  /**
   * A crashed copy's record accounts only for the writes its guard saw: refused once anything else
   * may have changed its volumes since — a later live copy of them, any later job that held one
   * exclusively (a copy into it, a restore), one deleted, or one deleted and made again under its
   * name (another id than the record names; told only where the backend gives ids). A revert
   * drops such records itself (Volumes.revert), as a writable export does.
   */
  private async assertUnchangedSince(rec: JobRecord, params: MirrorParams, intents: IntentRecord[]): Promise<void> {
    const refuse = (why: string) => new FailedPrecondition(`live copy ${rec.id} cannot be resumed from its write-intent record: ${why}`, { ref: rec.id, hint: 'start the copy again: `offload copy --live SRC DST`' });
    const volumes = new Set(params.pairs.flatMap((p) => [p.source, p.target]));
    const touches = (o: JobRecord) => ((o.params as unknown as MirrorParams).pairs ?? []).some((p) => volumes.has(p.source) || volumes.has(p.target));
    for (const o of await this.s.store.listJobs()) {
      if (o.id === rec.id || o.createdAt <= rec.createdAt) continue;
      if (o.type === 'mirror' && touches(o)) throw refuse(`live copy ${o.id} of the same volumes ran since`);
      const held = o.locks.find((l) => l.mode === 'exclusive' && volumes.has(l.key));
      if (held) throw refuse(`${o.type} job ${o.id} held ${held.key} since`);
    }
    for (const [i, p] of params.pairs.entries()) {
      for (const [ref, was] of [[p.source, intents[i]?.volumes?.source], [p.target, intents[i]?.volumes?.target]] as const) {
        const vol = await this.volume(ref);
        if (!vol) throw refuse(`${ref} does not exist any more`);
        if (was !== undefined && vol.id !== was) throw refuse(`${ref} is not the volume it copied (id ${String(vol.id)}, was ${was}): it was deleted and made again`);
      }
    }
  }

  /** A volume as its backend has it now (undefined: none of that name, or its backend is not configured here). */
  private async volume(ref: string): Promise<Volume | undefined> {
    const v = parseVolumeRef(ref);
    const b = this.s.backends.get(v.backend);
    return b ? call(b.backend, 'get', ref, () => b.backend.getVolume(v.volume)) : undefined;
  }

  /** One job for every pair (the disks of one VM): ready when all are, switched over all or none. */
  /** `recheck`: run again under the job's locks (a resumption's checks: its record may have changed since). */
  async start(pairs: { source: string; target: string; since?: string; pending?: unknown; sizeBytes?: number; made?: true }[], opts: CopyOptions, plan: Plan, recheck?: () => Promise<unknown>): Promise<Job> {
    const mode = opts.mode ?? 'background';
    if (mode !== 'background' && mode !== 'write-blocking') throw new InvalidArgument(`a live copy's mode is background or write-blocking, got ${String(mode)}`);
    if (opts.verify) throw new InvalidArgument('--verify compares a copy of a volume at rest; a live copy\'s source changes while it runs', { hint: 'leave out --verify' });
    if (!Array.isArray(pairs) || pairs.length === 0) throw new InvalidArgument('a live copy needs at least one SRC=DST pair');
    const seen = new Set<string>();
    const refs = pairs.map((p) => {
      if (p === null || typeof p !== 'object' || typeof p.source !== 'string' || typeof p.target !== 'string') throw new InvalidArgument('a live copy pair is { source, target }');
      // `made` comes from the record of the copy resumed (a caller's pairs are { source, target } only: DataJobs.liveCopy).
      const made = p.made === true;
      const pair = { source: volumeKey(parseVolumeRef(p.source)), target: volumeKey(parseVolumeRef(p.target)), since: (p as { since?: unknown }).since ?? opts.since, pending: p.pending, sizeBytes: p.sizeBytes, made };
      for (const ref of [pair.source, pair.target]) {
        if (seen.has(ref)) throw new InvalidArgument(`${ref} appears twice in the live copy: each volume is one pair's source or target`, { ref });
        seen.add(ref);
      }
      return pair;
    });
    // Sources another process serves (a control node copying a running VM's disks): a new copy is
    // asked of that process, where their writes are seen; the job is followed here through the store.
    // A new copy's pairs are { source, target } (DataJobs.liveCopy), with the caller's --since, if any.
    if (recheck === undefined && refs.every((p) => p.pending === undefined && !p.made)) {
      const elsewhere = await this.servedElsewhere(refs.map((p) => p.source));
      if (elsewhere) {
        if (opts.since === undefined) return this.askServingProcess(elsewhere, refs, { mode, ...(opts.speed !== undefined ? { speed: opts.speed } : {}) });
        if (typeof opts.since !== 'string' || refs.length !== 1) throw new InvalidArgument('a live copy from a snapshot (since) is of one volume: since is its snapshot\'s name');
        const job = await this.askServingProcess(elsewhere, refs, { mode, ...(opts.speed !== undefined ? { speed: opts.speed } : {}), since: opts.since });
        // A serving process of an older build knows no `since`: it would copy the whole volume.
        const started = (job.info().params as { pairs?: { since?: string }[] }).pairs?.[0]?.since;
        if (started !== sinceName(parseVolumeRef(refs[0]!.source), opts.since)) {
          await job.cancel().catch(() => undefined);
          throw new FailedPrecondition(`the process serving ${refs[0]!.source} started the copy without --since (an older build?): cancelled`, {
            ref: refs[0]!.source, hint: 'run it there (`offload --server ADDR copy --live … --since …`), or update that service',
          });
        }
        return job;
      }
    }
    const prepared: Prepared[] = [];
    for (const p of refs) prepared.push(await this.prepare(p.source, p.target, p.since, p.pending, p.sizeBytes, p.made));
    const params: MirrorParams = { mode, pairs: prepared.map((p) => p.pair) };
    const s = this.s;
    let jobId: string | undefined;
    const task = mirrorTask(params, {
      pairs: prepared.map((p) => p.deps(() => jobId, (id) => { jobId = id; })),
      suspending: () => s.suspendLiveCopies && s.exports.isClosing,
      dropIntent: (id) => dropWriteIntent(s.store, id),
      warn: (message) => s.logger.warn(message),
      ...trimEveryFromEnv(),
      failClosed: (why) => {
        s.logger.error(`the switch-over record of job ${jobId} cannot be made true again (${toOffloadError(why).message}); the exports stop rather than serve a side the record does not name`);
        for (const p of prepared) void s.exports.stop(p.exportName).catch(() => undefined);
      },
    });
    const locks = prepared.flatMap((p) => [{ key: p.pair.source, mode: 'exclusive' as const }, { key: p.pair.target, mode: 'exclusive' as const }]);
    const speed = checkSpeed(opts.speed);
    // And within what reads a snapshot of a source (a clone of a point of the VM's disk): the copy moves the disk, not its points.
    const readers = await snapshotReaders(this.s, prepared.map((p) => p.pair.source), locks);
    this.s.assertOpen();
    // Within every source's export (LockHolder.within takes one holder: a group's exports are checked by the keyed mutex here).
    return this.s.mutex.run(locks.map((l) => l.key), () => this.s.jobs.start({
      task, ref: prepared.map((p) => p.pair.target).join(','), executor: 'host', principal: this.a.principal, locks, plan,
      within: [...prepared.map((p) => p.holder), ...readers], ...(speed ? { speed } : {}),
      // A source is held by this broker's export (checked under its lock); a target that was there is checked again.
      check: async () => {
        for (const p of prepared) if (!p.pair.create) await this.a.assertOwns(parseVolumeRef(p.pair.target));
        await recheck?.();
      },
    }));
  }

  /** Check one pair and make its part of the job: the source's export and device, the target (made by the job if missing). */
  private async prepare(source: string, target: string, since?: unknown, pending?: unknown, intentSize?: number, made = false): Promise<Prepared> {
    const src = parseVolumeRef(source);
    const dst = parseVolumeRef(target);
    await this.a.assertOwns(src);
    const exp = this.s.exports.list().find((e) => e.ref === source && !e.readOnly);
    if (!exp) throw await this.notExportedHere(source);
    if (exp.liveJob !== undefined) {
      throw new Busy(`${source} is already under live job ${exp.liveJob}`, { ref: source, hint: `wait for job ${exp.liveJob}, complete it or cancel it`, data: { holder: exp.liveJob } });
    }
    const served = this.s.exports.device(exp.name);
    if (!served) throw await this.notExportedHere(source);
    if (!(served.device instanceof LiveDevice)) throw new InternalError(`export ${exp.name} of ${source} does not serve through a LiveDevice`);
    const live = served.device;

    const d = this.s.entry(dst.backend);
    const existing = await call(d.backend, 'get', target, () => d.backend.getVolume(dst.volume));
    let create: MirrorPair['create'];
    if (existing) {
      await this.a.assertOwns(dst);
      if (existing.sizeBytes < live.sizeBytes) {
        throw new OutOfRange(`${target} (${existing.sizeBytes} bytes) is smaller than ${source} (${live.sizeBytes} bytes)`, { ref: target, hint: 'resize the target first, or name a new volume for the copy to create' });
      }
    } else {
      // A migration keeps the volume's owner: the target is the source's owner's (a tenant's volume stays the tenant's).
      const owner = this.a.isAdmin ? (await this.s.ownerOf(source)) ?? ADMIN.id : this.a.ownerFor(undefined);
      create = { sizeBytes: live.sizeBytes, owner: await this.a.targetOwner(dst, d.backend, owner, false) };
    }
    let resumeFrom: string | undefined;
    if (since !== undefined) {
      if (create) throw new NotFound(`${target} does not exist: a live copy resumed --since a snapshot copies into the target it left`, { ref: target });
      resumeFrom = sinceName(src, since);
      // Refused now (no snapshot, a backend that cannot tell) rather than in the job.
      await this.s.changes(src, { since: resumeFrom, offset: 0, length: 1 });
    }
    // Resumed after a crash: the target equals the source but where the write-intent record says.
    const crashed = resumeFrom === undefined && pending !== undefined;
    if (crashed) {
      if (create) throw new NotFound(`${target} does not exist: a live copy resumed after a crash copies into the target it left`, { ref: target });
      if (intentSize !== live.sizeBytes) throw new FailedPrecondition(`${source} is ${live.sizeBytes} bytes, its live copy's write-intent record covers ${String(intentSize)}: start the copy again`, { ref: source });
    }
    const behind = resumeFrom !== undefined || crashed ? checkRanges(pending, live.sizeBytes, source) : [];
    const pair: MirrorPair = {
      source, target, ...(create ? { create } : {}), ...(made && !create ? { made: true as const } : {}), ...(resumeFrom !== undefined ? { since: resumeFrom } : {}), ...(behind.length > 0 || crashed ? { pending: behind } : {}),
    };
    const name = exp.name;
    const exportOwner = served.owner;
    const s = this.s;
    return {
      pair, exportName: name, holder: served.holder,
      deps: (jobId, setJobId) => ({
        source: live,
        attach: (id) => {
          setJobId(id);
          s.exports.setLive(name, { id, cancel: () => cancelAndWait(s, id) });
        },
        detach: () => {
          try {
            s.exports.setLive(name, undefined);
          } catch {
            // the export is gone already
          }
        },
        openTarget: async (c) => {
          const deps = s.cloneDeps();
          if (c) {
            if (await deps.find(target)) throw new FailedPrecondition(`${target} appeared while the live copy started; it copies into a volume it creates or one named when it starts`, { ref: target });
            await deps.create(target, c.sizeBytes, c.owner);
          }
          return deps.open(target, 'rw');
        },
        identify: async () => {
          const [sv, tv] = [await this.volume(source), await this.volume(target)];
          return { ...(sv?.id !== undefined ? { source: sv.id } : {}), ...(tv?.id !== undefined ? { target: tv.id } : {}) };
        },
        prepareSwitch: async (id) => {
          // The export's locks on the target, taken within the job that holds it now; published before the switch.
          const hold = await holdExport(s, { name, ref: dst, readOnly: false, principal: exportOwner, within: id });
          return {
            undo: () => hold.release(),
            done: async (old: BlockDevice) => {
              const releaseSource = s.exports.retarget(name, { ref: target, holder: hold.id, release: () => hold.release() });
              const info = s.exports.get(name);
              if (info) await hold.list(info.uri, info.startedAt).catch((e: unknown) => s.logger.warn(`export ${name}: recording it as ${target} failed: ${toOffloadError(e).message}`));
              await old.flush().catch(() => undefined);
              await old.close().catch((e: unknown) => s.logger.warn(`closing ${source} after the switch-over failed: ${toOffloadError(e).message}`));
              await releaseSource();
              s.logger.info(`export ${name} switched over from ${source} to ${target}`, { job: jobId() });
            },
          };
        },
        removeTarget: () => s.cloneDeps().remove(target),
        changesSince: async (since) => (await s.changes(src, { since })).extents,
        // Also while the broker closes (a suspend): the backend stays open until the jobs have ended.
        markPoint: async (id) => {
          const b = s.backends.get(src.backend)!;
          if (!b.capabilities.hasAll('snapshot.create', 'data.dirty')) return undefined;
          const name = pointName(id);
          await call(b.backend, 'snapshot', `${source}@${name}`, () => b.backend.createSnapshot(src.volume, name));
          return name;
        },
        dropSnapshot: async (name) => {
          const b = s.backends.get(src.backend)!;
          await call(b.backend, 'delete', `${source}@${name}`, () => b.backend.deleteSnapshot(src.volume, name));
        },
      }),
    };
  }

  /**
   * The export record of the process that serves every source read-write when none is served
   * here: that process runs the copy. Undefined when a source is served here or by no one (the
   * copy is made, or refused, here); FailedPrecondition when two processes serve them.
   */
  async servedElsewhere(sources: string[]): Promise<ExportRecord | undefined> {
    if (this.s.exports.list().some((e) => sources.includes(e.ref) && !e.readOnly)) return undefined;
    const foreign = (await this.s.jobs.foreignExports()).filter((e) => sources.includes(e.ref) && !e.readOnly);
    if (!sources.every((src) => foreign.some((e) => e.ref === src))) return undefined;
    if (foreign.some((e) => e.runnerToken !== foreign[0]!.runnerToken)) {
      throw new FailedPrecondition(`${sources.join(', ')} are served by more than one process: a live copy of them runs in the one process that sees all their writes`, {
        ref: sources.join(','), hint: "serve one VM's disks from one service, or copy them one by one",
      });
    }
    return foreign.find((e) => e.ref === sources[0])!;
  }

  /**
   * Ask the process serving the sources (its export `exp`) to start the copy (or, `options.resume`,
   * to resume the live copy of that id); the job as this broker sees it, run there.
   */
  async askServingProcess(exp: ExportRecord, pairs: { source: string; target: string }[], options: NonNullable<OpCall['options']>): Promise<Job> {
    const what = `copy ${pairs.map((p) => `${p.source} to ${p.target}`).join(', ')} live`;
    const answer = await callExportHolder(this.s, exp.id, {
      kind: 'copy.live', ref: exp.ref, pairs: pairs.map((p) => ({ source: p.source, target: p.target })),
      options, principal: { id: this.a.principal.id, role: this.a.principal.role },
    }, what);
    if (answer === GONE) throw await this.notExportedHere(exp.ref); // its export ended first
    return this.s.jobs.get((answer as { job: string }).job);
  }

  /** Why a source exported elsewhere, or not at all, cannot be copied live here. */
  private async notExportedHere(source: string): Promise<FailedPrecondition> {
    const elsewhere = (await this.s.jobs.foreignExports()).find((e) => e.ref === source && !e.readOnly);
    if (elsewhere) {
      return new FailedPrecondition(`${source} is exported by another process (${elsewhere.runnerHost} pid ${elsewhere.runnerPid}, export ${elsewhere.name}): a live copy of disks not all served by that one process runs only in the process that serves its sources' writes`, {
        ref: source, hint: 'run it there: `offload --server ADDR copy --live …` (a new or resumed copy of disks that one process serves is asked of it)',
      });
    }
    return new FailedPrecondition(`${source} is not exported read-write by this broker: a live copy sees the writes to its source through its export`, {
      ref: source, hint: 'export it first (`offload --server ADDR nbd SRC`, with the VM using that export), then copy it live through the same service',
    });
  }
}

/** The snapshot a live copy names the point its target equals (its sources' `live-<job>`). */
function pointName(jobId: string): string {
  return `live-${jobId.slice(jobId.lastIndexOf('-') + 1)}`;
}

/**
 * A pair of a resumed live copy: from its source's snapshot `since`, plus where the target was
 * behind on there; or, after a crash, where its write-intent record said it might differ
 * (`pending`, no `since`), for a source of `sizeBytes`.
 */
/**
 * OFFLOAD_LIVE_TRIM_MS (tests): how often a live copy's write-intent record lets go of regions in
 * sync, before ready and after, in place of mirror-task.ts's periods — so that a test of a record
 * with regions gone waits a second, not two 4 s periods.
 */
function trimEveryFromEnv(): { trimEveryMs?: { ready: number; bulk: number } } {
  const ms = Number(process.env.OFFLOAD_LIVE_TRIM_MS);
  return Number.isInteger(ms) && ms > 0 ? { trimEveryMs: { ready: ms, bulk: ms } } : {};
}

interface ResumedPair { source: string; target: string; since?: string; pending?: ByteRange[]; sizeBytes?: number; made?: true }

/** A resumed pair's target was made by the copy (its first job, or one resumed before). */
function madeBy(p: MirrorPair): { made?: true } {
  return p.create !== undefined || p.made === true ? { made: true } : {};
}

/** Ranges a record says a target was behind on: whole numbers within the source, else refused. */
function checkRanges(value: unknown, size: number, ref: string): ByteRange[] {
  if (value === undefined) return [];
  const ok = (n: unknown): n is number => typeof n === 'number' && Number.isSafeInteger(n) && n >= 0;
  if (!Array.isArray(value) || !value.every((r: { offset?: unknown; length?: unknown }) => ok(r?.offset) && ok(r?.length) && r.offset! + r.length! <= size)) {
    throw new InvalidArgument(`the ranges ${ref}'s copy was behind on are not byte ranges within its ${size} bytes`, { ref });
  }
  return value as ByteRange[];
}

/** One pair, checked, before its job exists. */
interface Prepared {
  pair: MirrorPair;
  exportName: string;
  /** The id the export's locks are held under. */
  holder: string;
  deps(jobId: () => string | undefined, setJobId: (id: string) => void): MirrorPairDeps;
}

async function cancelAndWait(s: BrokerState, id: string): Promise<void> {
  const job = await s.jobs.get(id);
  await job.cancel().catch(() => undefined); // already ending
  await job.wait();
}
