/**
 * The broker's long operations for one principal: clone, stream, commit and copy. Each runs the
 * plan the planner made — offloaded to the backend that owns the data, or on the host as a job —
 * rather than deciding again here.
 */
import { cloneResult } from './clone-result.js';
import type { CloneOptions, CloneStart, CopyOptions, InstantCloneOptions, LiveCopyOptions } from '../broker-api.js';
import { cloneTask, hostCopyTask, type HostCloneParams } from '../copy/host-copy.js';
import type { Job } from '../jobs/job.js';
import type { JobTask } from '../jobs/job-task.js';
import type { LockRequest } from '../locks/lock-manager.js';
import type { StorageBackend } from '../backend/storage-backend.js';
import { AlreadyExists, Busy, InternalError, InvalidArgument, NotFound, OutOfRange, toOffloadError, Unsupported } from '../model/errors.js';
import { isSnapshotRef, parseRef, parseSnapshotRef, parseVolumeRef, snapshotKey, volumeKey, type Ref, type VolumeRef } from '../model/refs.js';
import type { Volume } from '../model/types.js';
import type { Operation, Plan } from '../planner/plan.js';
import { Access } from './access.js';
import { LiveCopies } from './live-copies.js';
import { markResumed } from '../live/mirror-task.js';
import { InstantClones } from './instant-clones.js';
import { checkSize, checkSpeed, planOrRefuse, readerWithin, readLocks, runShort } from './operation.js';
import { call, sinceName, type BrokerState } from './state.js';
import type { Volumes } from './volumes.js';

/** The long operations (clone, stream, commit, copy) of one principal's broker view. */
export class DataJobs {
  constructor(private readonly s: BrokerState, private readonly a: Access, private readonly volumes: Volumes) {}

  async clone(source: string, target: string, opts: CloneOptions = {}): Promise<Volume> {
    const started = await this.startClone(source, target, opts);
    // An instant clone is usable once started: its fill goes on in the background.
    if (opts.instant && started.job) return this.volumes.get(target);
    return cloneResult(started, () => this.volumes.get(target));
  }

  async startClone(source: string, target: string, opts: CloneOptions = {}): Promise<CloneStart> {
    if (opts.mode !== undefined && opts.mode !== 'linked' && opts.mode !== 'full') {
      throw new InvalidArgument(`clone mode must be "linked" or "full", got ${String(opts.mode)}`);
    }
    checkPrefer(opts.prefer);
    if (opts.instant !== undefined && typeof opts.instant !== 'boolean') throw new InvalidArgument(`instant is true or false, got ${String(opts.instant)}`);
    if (opts.copyOnRead && !opts.instant) throw new InvalidArgument('copyOnRead applies to an instant clone', { hint: 'add --instant' });
    const src = parseRef(source);
    const dst = parseVolumeRef(target);
    await this.a.assertOwns(src);
    if (opts.instant) {
      if (opts.prefer === 'native') throw new InvalidArgument('an instant clone runs through the host', { hint: 'leave out --prefer native' });
      const plan = planOrRefuse(this.s, { op: 'clone', source, target, mode: 'full', prefer: 'host' }, `clone ${source} to ${target}`, source);
      return { job: await new InstantClones(this.s, this.a).start([{ source, target }], opts, plan, (ref) => this.sourceSize(parseRef(ref), ref)) };
    }
    const op: Operation = { op: 'clone', source, target, ...(opts.mode ? { mode: opts.mode } : {}), ...(opts.prefer ? { prefer: opts.prefer } : {}) };
    const plan = planOrRefuse(this.s, op, `clone ${source} to ${target}`, source);
    const d = this.s.entry(dst.backend);
    const size = opts.sizeBytes === undefined ? undefined : checkSize(opts.sizeBytes, target, d.capabilities);
    const owner = this.a.ownerFor(opts.owner);
    const [first] = plan.steps;
    switch (first?.action) {
      case 'clone.linked':
      case 'clone.full':
        if (opts.verify || opts.speed) {
          throw new InvalidArgument(`clone ${source} to ${target}: ${opts.verify ? '--verify' : '--speed'} applies to a copy through the host, and this clone is offloaded to ${dst.backend} (${first.action})`, {
            hint: 'add --prefer host (and --full) to copy through the host, or leave the option out',
          });
        }
        return { volume: await this.nativeClone(src, dst, first.action === 'clone.linked' ? 'linked' : 'full', size, owner, opts.owner !== undefined) };
      case 'volume.create':
        if (plan.steps[1]?.action === 'data.copy') return { job: await this.hostClone(src, dst, plan, size, owner, opts) };
    }
    throw new InternalError(`clone ${source} to ${target}: the planner's steps (${plan.steps.map((st) => st.action).join(', ')}) are not a clone`);
  }

  private async nativeClone(src: Ref, dst: VolumeRef, mode: 'linked' | 'full', size: number | undefined, owner: string, explicit: boolean): Promise<Volume> {
    const source = `${src.backend}/${src.volume}${isSnapshotRef(src) ? `@${src.snapshot}` : ''}`;
    const target = volumeKey(dst);
    const d = this.s.entry(dst.backend);
    const locks: LockRequest[] = [...readLocks(src), { key: target, mode: 'exclusive' }];
    return runShort(this.s, this.a.principal, locks, `clone ${source} to ${target}`,
      async () => {
        await this.a.assertOwns(src); // again under the lock (Volumes.resize)
        const recorded = await this.a.targetOwner(dst, d.backend, owner, explicit);
        const vol = await call(d.backend, 'clone', `${source} → ${target}`, () => d.backend.createVolume({
          name: dst.volume, owner: recorded, mode,
          source: { volume: src.volume, ...(isSnapshotRef(src) ? { snapshot: src.snapshot } : {}) },
          ...(size !== undefined ? { sizeBytes: size } : {}),
        }));
        await this.s.setOwner(target, recorded);
        return { ...vol, owner: recorded };
      }, await readerWithin(this.s, locks));
  }

  /** The target is created by the clone job itself, under the job's exclusive lock (see cloneTask). */
  private async hostClone(src: Ref, dst: VolumeRef, plan: Plan, size: number | undefined, owner: string, opts: CloneOptions): Promise<Job> {
    const source = isSnapshotRef(src) ? `${src.backend}/${src.volume}@${src.snapshot}` : `${src.backend}/${src.volume}`;
    const target = volumeKey(dst);
    const srcSize = await this.sourceSize(src, source);
    if (size !== undefined && size < srcSize) {
      throw new OutOfRange(`clone size ${size} is smaller than the source's ${srcSize} bytes`, { ref: target });
    }
    const d = this.s.entry(dst.backend);
    // Refused early for a clear error; the job checks again under its lock, where it counts.
    if (await call(d.backend, 'get', target, () => d.backend.getVolume(dst.volume))) {
      throw new AlreadyExists(`${target} already exists; a clone through the host needs a new volume`, { ref: target, hint: 'delete it first, or use `offload copy` to overwrite it' });
    }
    const recorded = await this.a.targetOwner(dst, d.backend, owner, opts.owner !== undefined);
    const params: HostCloneParams = { source, target, targetFresh: true, sizeBytes: size ?? srcSize, owner: recorded, ...(opts.verify ? { verify: true } : {}) };
    return this.startJob(cloneTask(params, this.s.cloneDeps()), target, 'host', undefined, [
      ...readLocks(src),
      { key: target, mode: 'exclusive' },
    ], plan, checkSpeed(opts.speed), () => this.a.assertOwns(src));
  }

  private async sourceSize(src: Ref, source: string): Promise<number> {
    const vol = await this.volumes.get(`${src.backend}/${src.volume}`);
    if (!isSnapshotRef(src)) return vol.sizeBytes;
    const b = this.s.entry(src.backend).backend;
    const snap = (await call(b, 'list snapshots of', source, () => b.listSnapshots(src.volume))).find((x) => x.name === src.snapshot);
    if (!snap) throw new NotFound(`snapshot ${source} does not exist`, { ref: source });
    return snap.sizeBytes;
  }

  async stream(refText: string, opts: { base?: string; speed?: number } = {}): Promise<Job> {
    return this.chainJob('stream', refText, opts);
  }

  async commit(refText: string, opts: { base?: string; speed?: number } = {}): Promise<Job> {
    return this.chainJob('commit', refText, opts);
  }

  private async chainJob(verb: 'stream' | 'commit', refText: string, opts: { base?: string; speed?: number }): Promise<Job> {
    const ref = parseVolumeRef(refText);
    const plan = planOrRefuse(this.s, { op: verb, ref: refText, ...(opts.base ? { base: opts.base } : {}) }, `${verb} ${refText}`, refText);
    const b = this.s.entry(ref.backend);
    await this.a.assertOwns(ref);
    const make = verb === 'stream' ? b.backend.streamVolume : b.backend.commitVolume;
    if (!make) throw new Unsupported(`${ref.backend} reports chain.${verb} but has no ${verb}Volume`, { ref: refText });
    // A commit writes the volume's data into a snapshot (and merges the layers between): it holds
    // every snapshot of the volume exclusively, so that nothing reads one while it changes — a
    // backup copying from its marker, a read-only export of a snapshot.
    const snapshots = verb === 'commit' ? await this.snapshotNames(b.backend, ref) : [];
    const locks: LockRequest[] = [
      { key: volumeKey(ref), mode: 'exclusive' },
      ...snapshots.map((snapshot) => ({ key: snapshotKey({ ...ref, snapshot }), mode: 'exclusive' as const })),
    ];
    const task = await call(b.backend, verb, refText, () => make.call(b.backend, ref.volume, opts.base ? { base: opts.base } : {}));
    return this.startJob(task, refText, `backend:${ref.backend}`, ref.backend, locks, plan, checkSpeed(opts.speed), async () => {
      await this.a.assertOwns(ref);
      // Under the job's locks: a snapshot taken between the listing and them would not be held.
      const now = verb === 'commit' ? await this.snapshotNames(b.backend, ref) : [];
      const added = now.filter((n) => !snapshots.includes(n));
      if (added.length > 0) {
        throw new Busy(`${refText} got snapshot ${added.join(', ')} while its commit started`, { ref: refText, hint: 'start the commit again' });
      }
    });
  }

  private async snapshotNames(backend: StorageBackend, ref: VolumeRef): Promise<string[]> {
    return (await call(backend, 'list snapshots of', `${ref.backend}/${ref.volume}`, () => backend.listSnapshots(ref.volume))).map((x) => x.name);
  }

  async copy(source: string, target: string, opts: CopyOptions = {}): Promise<Job> {
    checkPrefer(opts.prefer);
    if (opts.prefer === 'native') {
      throw new InvalidArgument(`copy ${source} to ${target}: a copy into an existing volume always runs through the host; there is no native way to prefer`, { hint: 'leave out --prefer' });
    }
    if (opts.live !== undefined && typeof opts.live !== 'boolean') throw new InvalidArgument(`live is true or false, got ${String(opts.live)}`);
    const plan = planOrRefuse(this.s, { op: 'copy', source, target }, `copy ${source} to ${target}`, source);
    if (opts.live) return new LiveCopies(this.s, this.a).start([{ source, target }], opts, plan);
    if (opts.mode !== undefined) throw new InvalidArgument('--mode applies to a live copy', { hint: 'add --live, or leave out --mode' });
    const src = parseRef(source);
    await this.a.assertOwns(src);
    await this.a.assertOwns(parseVolumeRef(target));
    const [srcSize, t] = await Promise.all([this.sourceSize(src, source), this.volumes.get(target)]);
    if (t.sizeBytes < srcSize) {
      throw new OutOfRange(`${target} (${t.sizeBytes} bytes) is smaller than ${source} (${srcSize} bytes)`, { ref: target, hint: 'resize the target first' });
    }
    const since = opts.since === undefined ? undefined : await this.checkSince(src, opts.since);
    const params = { source, target, targetFresh: false, ...(opts.verify ? { verify: true } : {}), ...(since !== undefined ? { since } : {}) };
    const task = hostCopyTask(params, (ref, mode) => this.s.openDevice(ref, mode), this.s.changeLister());
    return this.startJob(task, target, 'host', undefined, [
      ...readLocks(src),
      // The snapshot the changes are counted from stays while the job may ask again (a resume).
      ...(since !== undefined ? [{ key: snapshotKey({ backend: src.backend, volume: src.volume, snapshot: since }), mode: 'shared' as const }] : []),
      { key: volumeKey(parseVolumeRef(target)), mode: 'exclusive' },
    ], plan, checkSpeed(opts.speed), async () => {
      await this.a.assertOwns(src);
      await this.a.assertOwns(parseVolumeRef(target));
    });
  }

  /**
   * `since` of an incremental copy: a snapshot of the source volume, taken before the source
   * point, on a backend that can say what changed since (else Unsupported, with the reason).
   */
  private async checkSince(src: Ref, since: unknown): Promise<string> {
    const name = sinceName(src, since);
    // Asked now for one byte, so that a backend that cannot tell, an unknown snapshot or a
    // source older than it is refused before a job starts (the job asks again for everything).
    await this.s.changes(src, { since: name, offset: 0, length: 1 });
    return name;
  }

  async liveCopy(pairsIn: { source: string; target: string }[], opts: LiveCopyOptions = {}): Promise<Job> {
    if (opts === null || typeof opts !== 'object') throw new InvalidArgument('live copy options are an object: { mode?, speed?, resume? }');
    // Only a resume says where a target is behind: given pairs are { source, target }, nothing more.
    let pairs: { source: string; target: string; since?: string; pending?: unknown; sizeBytes?: number; made?: true }[] = Array.isArray(pairsIn)
      ? pairsIn.map((p) => (p !== null && typeof p === 'object' ? { source: p.source, target: p.target } : p))
      : pairsIn;
    let as = this.a;
    let stale: string[] = [];
    let crashed = false;
    if (opts.resume !== undefined) {
      const resumed = await new LiveCopies(this.s, this.a).resumeOf(opts.resume, pairsIn);
      // Its sources served by another process (a copy cancelled there after ready): resumed there.
      const live = new LiveCopies(this.s, this.a);
      const elsewhere = await live.servedElsewhere(resumed.pairs.map((p) => p.source));
      if (elsewhere) {
        return live.askServingProcess(elsewhere, resumed.pairs, {
          resume: String(opts.resume), ...(opts.mode !== undefined ? { mode: opts.mode } : {}), ...(opts.speed !== undefined ? { speed: opts.speed } : {}),
        });
      }
      pairs = resumed.pairs;
      stale = resumed.stale;
      crashed = resumed.crashed;
      opts = { mode: resumed.mode, ...opts };
      // An administrator resuming another's copy (the service after its restart) keeps it that principal's.
      if (this.a.isAdmin && resumed.owner.id !== this.a.principal.id) as = new Access(this.s, resumed.owner);
    }
    if (!Array.isArray(pairs) || pairs.length === 0) throw new InvalidArgument('a live copy needs at least one { source, target } pair');
    const first = pairs[0]!;
    const plan = planOrRefuse(this.s, { op: 'copy', source: String(first?.source), target: String(first?.target) }, `copy ${String(first?.source)} to ${String(first?.target)}`, String(first?.source));
    // A resumption is checked again once the job holds the volumes: its record may have lost its
    // write-intent record since (a writer dismissed, a volume opened for writing).
    const resume = opts.resume;
    const recheck = resume === undefined ? undefined : () => new LiveCopies(this.s, this.a).resumeOf(resume, pairsIn);
    const job = await new LiveCopies(this.s, as).start(pairs, { ...opts, live: true }, plan, recheck);
    // The new job's own record takes over from the one it resumes (a crashed one's write intent is
    // dropped; the sources' writes wait for the new job's guard meanwhile).
    if (opts.resume !== undefined) {
      await markResumed(this.s.store, String(opts.resume), job.id).catch((e: unknown) => this.s.logger.warn(`marking live copy ${String(opts.resume)} as resumed by job ${job.id} failed${crashed ? ' (its write-intent record stays, and is no longer trusted: a later copy of its volumes ran)' : ''}: ${toOffloadError(e).message}`));
    }
    for (const ref of stale) {
      const snap = parseSnapshotRef(ref);
      const b = this.s.entry(snap.backend).backend;
      await call(b, 'delete', ref, () => b.deleteSnapshot(snap.volume, snap.snapshot)).catch((e: unknown) => {
        const err = toOffloadError(e);
        if (err.code !== 'NotFound') this.s.logger.warn(`dropping ${ref}, a point live copy ${opts.resume} no longer needs, failed: ${err.message}`);
      });
    }
    return job;
  }

  async instantClone(pairs: { source: string; target: string }[], opts: InstantCloneOptions = {}): Promise<Job> {
    if (opts === null || typeof opts !== 'object') throw new InvalidArgument('instant clone options are an object: { speed?, owner? }');
    if (!Array.isArray(pairs) || pairs.length === 0) throw new InvalidArgument('an instant clone needs at least one { source, target } pair');
    for (const p of pairs) {
      if (p === null || typeof p !== 'object' || typeof p.source !== 'string' || typeof p.target !== 'string') throw new InvalidArgument('an instant clone pair is { source, target }');
    }
    const first = pairs[0]!;
    const plan = planOrRefuse(this.s, { op: 'clone', source: first.source, target: first.target, mode: 'full', prefer: 'host' }, `clone ${first.source} to ${first.target}`, first.source);
    return new InstantClones(this.s, this.a).start(pairs, { ...opts, instant: true }, plan, (ref) => this.sourceSize(parseRef(ref), ref));
  }

  /** `check`: the tenant's ownership again, once the job's locks are held (StartJobRequest.check). */
  /** A job reading points of a disk in use works within what it is in use through (readerWithin). */
  private async startJob(task: JobTask, ref: string, executor: string, backend: string | undefined, locks: LockRequest[], plan: Plan, speed: number | undefined,
    check: () => Promise<void>): Promise<Job> {
    this.s.assertOpen();
    const within = await readerWithin(this.s, locks);
    return this.s.mutex.run(locks.map((l) => l.key), () => this.s.jobs.start({
      task, ref, executor, principal: this.a.principal, locks, plan, check, ...(backend ? { backend } : {}), ...(speed ? { speed } : {}), ...(within.length > 0 ? { within } : {}),
    }));
  }
}

function checkPrefer(prefer: unknown): void {
  if (prefer !== undefined && prefer !== 'native' && prefer !== 'host') throw new InvalidArgument(`prefer must be "native" or "host", got ${String(prefer)}`);
}
