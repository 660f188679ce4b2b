/**
 * The mock appliance's behaviour, independent of HTTP: volumes, snapshots, FlexClones, clone
 * split and the job engine. Mutations are validated and applied when accepted (the object is
 * visible at once) and answered with a job that goes queued → running → success; a clone split
 * is the exception: its job copies the shared chunks at the configured rate and ends when the
 * clone owns all its data. Injected job faults (failure, stuck) leave the state unchanged.
 */
import { randomUUID } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { OntapCode } from '../api/codes.js';
import type { Job, Snapshot, Volume, VolumeCreateBody, VolumePatchBody } from '../api/schemas.js';
import { ApiError, invalid, notFound } from './api-error.js';
import { ChunkStore, type ByteSpan, type MapExtent } from '../../appliance-kit/index.js';
import { finishJob, fromSaved, newJobRecord, toSaved, type JobRecord, type SavedState, type SnapshotRecord, type VolumeRecord } from './records.js';
import { jobView, percent, snapshotView, volumeView } from './views.js';
import { advanceJobs } from './job-clock.js';

export interface ApplianceOptions {
  stateDir?: string;
  svms?: string[];
  /** How long a finished job stays visible (ONTAP: 300 s). */
  jobExpiryMs?: number;
  /** How fast a clone split copies shared data. */
  splitBytesPerSecond?: number;
  /** How long an ordinary job takes from queued to success. */
  jobDurationMs?: number;
  chunkSize?: number;
}

/** What a request asks of the job it creates (from the fault injector). */
export interface JobFault {
  failAfterPolls?: number;
  failure?: { code: string; message: string };
  stuck?: boolean;
  expired?: boolean;
}

const NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,202}$/;

/** The mock ONTAP's state and rules (see above), independent of HTTP. */
export class OntapAppliance {
  readonly svms: string[];
  readonly jobExpiryMs: number;
  readonly splitBytesPerSecond: number;
  readonly jobDurationMs: number;
  readonly store: ChunkStore;
  private readonly volumes = new Map<string, VolumeRecord>();
  private readonly jobs = new Map<string, JobRecord>();
  private readonly statePath?: string;
  private lastTick = Date.now();

  constructor(opts: ApplianceOptions = {}) {
    this.svms = opts.svms ?? ['svm0'];
    this.jobExpiryMs = opts.jobExpiryMs ?? 300_000;
    this.splitBytesPerSecond = opts.splitBytesPerSecond ?? 64 * 1024 * 1024;
    this.jobDurationMs = opts.jobDurationMs ?? 40;
    const chunkSize = opts.chunkSize ?? 64 * 1024;
    if (opts.stateDir) {
      mkdirSync(opts.stateDir, { recursive: true });
      this.statePath = join(opts.stateDir, 'state.json');
    }
    this.store = new ChunkStore(chunkSize, opts.stateDir ? join(opts.stateDir, 'chunks') : undefined);
    if (this.statePath && existsSync(this.statePath)) {
      const saved = JSON.parse(readFileSync(this.statePath, 'utf8')) as SavedState;
      const { volumes, jobs } = fromSaved(saved);
      for (const v of volumes) this.volumes.set(v.uuid, v);
      for (const j of jobs) this.jobs.set(j.uuid, j);
      this.store.load(
        volumes.flatMap((v) => [v.map, ...v.snapshots.map((s) => s.map)]),
        saved.nextChunkId,
      );
    }
  }

  /** Write the state atomically: new chunks, then state.json (temp + rename), then drop freed chunks. */
  save(): void {
    if (!this.statePath) {
      this.store.deleteReleasedChunks();
      return;
    }
    this.store.writeNewChunks();
    const tmp = `${this.statePath}.tmp`;
    writeFileSync(tmp, JSON.stringify(toSaved(this.volumes.values(), this.jobs.values(), this.store.nextChunkId)));
    renameSync(tmp, this.statePath);
    this.store.deleteReleasedChunks();
  }

  // ---- lookups -------------------------------------------------------------------------------

  allVolumes(): VolumeRecord[] {
    return [...this.volumes.values()];
  }

  allJobs(): JobRecord[] {
    return [...this.jobs.values()].filter((j) => !j.expired);
  }

  volume(uuid: string): VolumeRecord {
    const v = this.volumes.get(uuid);
    if (!v) throw notFound(`volume ${uuid}`, 'uuid');
    return v;
  }

  /** By uuid, or by name (within `svm` when given); the data plane accepts either. */
  volumeByUuidOrName(id: string, svm?: string): VolumeRecord {
    const byUuid = this.volumes.get(id);
    if (byUuid) return byUuid;
    const matches = this.allVolumes().filter((v) => v.name === id && (!svm || v.svm === svm));
    if (matches.length === 1) return matches[0]!;
    if (matches.length > 1) throw invalid(`volume name "${id}" exists in several SVMs; pass ?svm=NAME`, 'svm');
    throw notFound(`volume ${id}`, 'uuid');
  }

  private byName(name: string, svm: string): VolumeRecord | undefined {
    return this.allVolumes().find((v) => v.name === name && v.svm === svm);
  }

  snapshot(v: VolumeRecord, uuid: string): SnapshotRecord {
    const s = v.snapshots.find((x) => x.uuid === uuid);
    if (!s) throw notFound(`snapshot ${uuid} of volume ${v.name}`, 'uuid');
    return s;
  }

  private children(v: VolumeRecord): VolumeRecord[] {
    return this.allVolumes().filter((c) => c.clone?.parentVolumeUuid === v.uuid);
  }

  private splitRunning(v: VolumeRecord): boolean {
    return v.clone?.split !== undefined;
  }

  // ---- volumes -------------------------------------------------------------------------------

  createVolume(body: VolumeCreateBody, fault: JobFault): JobRecord {
    const svm = body.svm.name;
    if (!this.svms.includes(svm)) throw invalid(`SVM "${svm}" does not exist`, 'svm.name');
    if (!NAME.test(body.name)) throw invalid(`invalid volume name "${body.name}"`, 'name');
    if (this.byName(body.name, svm)) {
      throw new ApiError(409, OntapCode.DUPLICATE, `duplicate entry: volume "${body.name}" already exists in SVM "${svm}"`, 'name');
    }
    const job = this.newJob(`POST /api/storage/volumes`, svm, fault);
    if (!body.clone) {
      if (body.size === undefined) throw invalid('"size" is required to create a volume', 'size');
      if (!applies(fault)) return job;
      this.addVolume({ name: body.name, svm, size: body.size, comment: body.comment, map: new Map() });
      this.save();
      return job;
    }
    const parent = this.byName(body.clone.parent_volume.name, svm);
    if (!parent) throw notFound(`volume "${body.clone.parent_volume.name}"`, 'clone.parent_volume.name');
    let snap: SnapshotRecord | undefined;
    if (body.clone.parent_snapshot) {
      snap = parent.snapshots.find((s) => s.name === body.clone!.parent_snapshot!.name);
      if (!snap) throw notFound(`snapshot "${body.clone.parent_snapshot.name}" of volume "${parent.name}"`, 'clone.parent_snapshot.name');
    }
    const size = body.size ?? snap?.size ?? parent.size;
    if (size < (snap?.size ?? parent.size)) {
      throw new ApiError(400, OntapCode.SIZE_ERROR, `size ${size} is smaller than the parent's ${snap?.size ?? parent.size}`, 'size');
    }
    if (!applies(fault)) return job;
    const autoSnapshot = !snap;
    // ONTAP takes a base snapshot of the parent when none is named; so does the mock.
    snap ??= this.addSnapshot(parent, `clone_${body.name}.${stamp()}`);
    const v = this.addVolume({ name: body.name, svm, size: snap.size, comment: body.comment, map: this.store.copyMap(snap.map) });
    v.clone = {
      parentVolumeUuid: parent.uuid,
      parentVolumeName: parent.name,
      parentSnapshotUuid: snap.uuid,
      parentSnapshotName: snap.name,
      autoSnapshot,
    };
    if (size > v.size) v.size = size;
    this.save();
    return job;
  }

  private addVolume(init: { name: string; svm: string; size: number; comment?: string; map: Map<number, number> }): VolumeRecord {
    const v: VolumeRecord = { uuid: randomUUID(), createTime: new Date().toISOString(), snapshots: [], ...init };
    if (v.comment === undefined) delete v.comment;
    this.volumes.set(v.uuid, v);
    return v;
  }

  patchVolume(uuid: string, body: VolumePatchBody, restoreTo: string | undefined, fault: JobFault): JobRecord {
    const v = this.volume(uuid);
    if (restoreTo !== undefined) return this.restore(v, restoreTo, fault);
    if (body.clone?.split_initiated) return this.startSplit(v, fault);
    if (body.clone && !body.clone.split_initiated) throw invalid('only clone.split_initiated=true is supported', 'clone.split_initiated');
    const job = this.newJob(`PATCH /api/storage/volumes/${uuid}`, v.svm, fault);
    if (!applies(fault)) return job;
    if (body.size !== undefined && body.size !== v.size) {
      if (body.size < v.size) this.store.truncate(v.map, body.size);
      v.size = body.size;
    }
    if (body.comment !== undefined) v.comment = body.comment;
    this.save();
    return job;
  }

  private restore(v: VolumeRecord, name: string, fault: JobFault): JobRecord {
    const snap = v.snapshots.find((s) => s.name === name);
    if (!snap) throw notFound(`snapshot "${name}" of volume "${v.name}"`, 'restore_to.snapshot.name');
    if (this.splitRunning(v)) throw busy(v);
    const job = this.newJob(`PATCH /api/storage/volumes/${v.uuid}`, v.svm, fault);
    if (!applies(fault)) return job;
    this.store.dropMap(v.map);
    v.map = this.store.copyMap(snap.map);
    v.size = snap.size;
    this.save();
    return job;
  }

  private startSplit(v: VolumeRecord, fault: JobFault): JobRecord {
    if (!v.clone) throw new ApiError(400, OntapCode.NOT_A_CLONE, `volume "${v.name}" is not a FlexClone volume`, 'clone.split_initiated');
    if (v.clone.split) throw busy(v);
    const job = this.newJob(`PATCH /api/storage/volumes/${v.uuid}`, v.svm, fault);
    if (!applies(fault)) return job;
    job.kind = 'split';
    job.volumeUuid = v.uuid;
    const pending = this.sharedWithBase(v);
    v.clone.split = { jobUuid: job.uuid, pending, totalBytes: pending.length * this.store.chunkSize, copiedBytes: 0, credit: 0 };
    job.message = 'Clone split 0% complete';
    this.save();
    return job;
  }

  /** The clone's chunks still shared with its parent snapshot: [index, chunk id], in order. */
  private sharedWithBase(v: VolumeRecord): [number, number][] {
    if (!v.clone) return [];
    const parent = this.volumes.get(v.clone.parentVolumeUuid);
    const base = parent?.snapshots.find((s) => s.uuid === v.clone!.parentSnapshotUuid);
    const shared: [number, number][] = [];
    for (const [index, id] of v.map) if (base?.map.get(index) === id) shared.push([index, id]);
    return shared.sort((a, b) => a[0] - b[0]);
  }

  deleteVolume(uuid: string, fault: JobFault): JobRecord {
    const v = this.volume(uuid);
    const kids = this.children(v);
    if (kids.length > 0) {
      throw new ApiError(
        409,
        OntapCode.HAS_CLONES,
        `volume "${v.name}" has FlexClone children (${kids.map((k) => k.name).join(', ')}); delete or split them first`,
        'uuid',
      );
    }
    if (this.splitRunning(v)) throw busy(v);
    const job = this.newJob(`DELETE /api/storage/volumes/${uuid}`, v.svm, fault);
    if (!applies(fault)) return job;
    this.removeVolume(v);
    this.save();
    return job;
  }

  private removeVolume(v: VolumeRecord): void {
    for (const s of v.snapshots) this.store.dropMap(s.map);
    this.store.dropMap(v.map);
    this.volumes.delete(v.uuid);
    this.releaseBase(v);
  }

  /** Drop the base snapshot the mock created for this clone once nothing uses it. */
  private releaseBase(v: VolumeRecord): void {
    const c = v.clone;
    if (!c?.autoSnapshot) return;
    const parent = this.volumes.get(c.parentVolumeUuid);
    if (!parent) return;
    const users = this.allVolumes().filter((o) => o !== v && o.clone?.parentSnapshotUuid === c.parentSnapshotUuid);
    if (users.length > 0) return;
    const snap = parent.snapshots.find((s) => s.uuid === c.parentSnapshotUuid);
    if (!snap) return;
    this.store.dropMap(snap.map);
    parent.snapshots = parent.snapshots.filter((s) => s !== snap);
  }

  // ---- snapshots -----------------------------------------------------------------------------

  createSnapshot(volumeUuid: string, name: string, comment: string | undefined, fault: JobFault): JobRecord {
    const v = this.volume(volumeUuid);
    if (!NAME.test(name)) throw invalid(`invalid snapshot name "${name}"`, 'name');
    if (v.snapshots.some((s) => s.name === name)) {
      throw new ApiError(409, OntapCode.DUPLICATE, `duplicate entry: snapshot "${name}" already exists on volume "${v.name}"`, 'name');
    }
    const job = this.newJob(`POST /api/storage/volumes/${volumeUuid}/snapshots`, v.svm, fault);
    if (!applies(fault)) return job;
    const s = this.addSnapshot(v, name);
    if (comment !== undefined) s.comment = comment;
    this.save();
    return job;
  }

  private addSnapshot(v: VolumeRecord, name: string): SnapshotRecord {
    const s: SnapshotRecord = { uuid: randomUUID(), name, createTime: new Date().toISOString(), size: v.size, map: this.store.copyMap(v.map) };
    v.snapshots.push(s);
    return s;
  }

  deleteSnapshot(volumeUuid: string, snapUuid: string, fault: JobFault): JobRecord {
    const v = this.volume(volumeUuid);
    const s = this.snapshot(v, snapUuid);
    const users = this.allVolumes().filter((o) => o.clone?.parentSnapshotUuid === s.uuid);
    if (users.length > 0) {
      throw new ApiError(
        409,
        OntapCode.SNAPSHOT_LOCKED,
        `Snapshot copy "${s.name}" of volume "${v.name}" is locked: it backs FlexClone ${users.map((u) => u.name).join(', ')}`,
        'uuid',
      );
    }
    const job = this.newJob(`DELETE /api/storage/volumes/${volumeUuid}/snapshots/${snapUuid}`, v.svm, fault);
    if (!applies(fault)) return job;
    this.store.dropMap(s.map);
    v.snapshots = v.snapshots.filter((x) => x !== s);
    this.save();
    return job;
  }

  // ---- data plane ----------------------------------------------------------------------------

  /** Read a volume's data, or a snapshot's (its frozen map). */
  read(o: VolumeRecord | SnapshotRecord, offset: number, length: number): Buffer {
    return this.store.read(o.map, offset, length);
  }

  write(v: VolumeRecord, offset: number, data: Uint8Array): void {
    this.store.write(v.map, offset, data);
    this.save();
  }

  extents(o: VolumeRecord | SnapshotRecord, offset: number, length: number): MapExtent[] {
    return this.store.extents(o.map, offset, length);
  }

  /**
   * Block-level diff (the mock's stand-in for SnapDiff): the ranges of `diff` (a snapshot of `v`,
   * or absent: the volume now) that may read differently from the snapshot `base`, in whole
   * chunks, clipped to `[offset, offset+length)` and to the compared size. `base` must not be
   * newer than `diff`; snapshots are kept in the order they were taken.
   */
  blockDiff(v: VolumeRecord, base: SnapshotRecord, diff: SnapshotRecord | undefined, offset: number, length: number | undefined): { size: number; blockSize: number; ranges: ByteSpan[] } {
    if (diff && v.snapshots.indexOf(base) > v.snapshots.indexOf(diff)) {
      throw invalid(`base snapshot "${base.name}" is newer than diff snapshot "${diff.name}" of volume "${v.name}"`, 'base_snapshot.name');
    }
    const target = diff ?? v;
    const from = Math.min(offset, target.size);
    const to = length === undefined ? target.size : Math.min(target.size, from + length);
    return { size: target.size, blockSize: this.store.chunkSize, ranges: this.store.diff(base.map, target.map, from, to - from) };
  }

  // ---- jobs ----------------------------------------------------------------------------------

  private newJob(description: string, svm: string, fault: JobFault): JobRecord {
    const job = newJobRecord(description, svm, fault);
    this.jobs.set(job.uuid, job);
    return job;
  }

  /** A job GET: counts the poll (for injected failures) after bringing the state up to date. */
  pollJob(uuid: string): JobRecord {
    this.tick();
    const job = this.jobs.get(uuid);
    if (!job || job.expired) throw notFound(`job ${uuid}`, 'uuid');
    job.polls++;
    this.tick();
    return job;
  }

  job(uuid: string): JobRecord | undefined {
    const j = this.jobs.get(uuid);
    return j && !j.expired ? j : undefined;
  }

  /** Make a job vanish as if it had expired (fault injection); its work goes on. */
  expireJob(uuid: string): void {
    const j = this.jobs.get(uuid);
    if (j) j.expired = true;
  }

  cancelJob(uuid: string): JobRecord {
    this.tick();
    const job = this.job(uuid);
    if (!job) throw notFound(`job ${uuid}`, 'uuid');
    if (job.state === 'success' || job.state === 'failure') {
      throw invalid(`job ${uuid} has already ended (${job.state}) and cannot be cancelled`, 'action');
    }
    if (job.kind === 'split' && job.volumeUuid) {
      const v = this.volumes.get(job.volumeUuid);
      // Chunks copied so far stay with the clone; it remains a FlexClone.
      if (v?.clone?.split?.jobUuid === job.uuid) delete v.clone.split;
    }
    finishJob(job, { code: OntapCode.JOB_CANCELLED, message: 'Job cancelled by user request' });
    this.save();
    return job;
  }

  /** Advance every job and split to the current time, and forget expired jobs. */
  tick(now = Date.now()): void {
    const elapsed = Math.max(0, now - this.lastTick);
    this.lastTick = now;
    let changed = advanceJobs(this.jobs, now, { durationMs: this.jobDurationMs, expiryMs: this.jobExpiryMs }, (job) => this.advanceSplit(job, elapsed));
    // A split whose job record vanished (expired by fault) still runs to the end.
    for (const v of this.volumes.values()) {
      const split = v.clone?.split;
      if (split && !this.jobs.has(split.jobUuid)) {
        this.copySplitChunks(v, elapsed);
        changed = true;
      }
    }
    if (changed) this.save();
  }

  private advanceSplit(job: JobRecord, elapsedMs: number): boolean {
    const v = job.volumeUuid ? this.volumes.get(job.volumeUuid) : undefined;
    const split = v?.clone?.split;
    if (!v || !split || split.jobUuid !== job.uuid) {
      finishJob(job);
      return true;
    }
    this.copySplitChunks(v, elapsedMs);
    if (!v.clone) {
      finishJob(job);
    } else {
      job.message = `Clone split ${percent(split.copiedBytes, split.totalBytes)}% complete`;
    }
    return true;
  }

  /** Copy as many still-shared chunks as the rate allows for the elapsed time; end the split when done. */
  private copySplitChunks(v: VolumeRecord, elapsedMs: number): void {
    const split = v.clone!.split!;
    // Credit accumulates across ticks so that the rate holds even when a tick buys less than a chunk.
    split.credit += (this.splitBytesPerSecond * elapsedMs) / 1000;
    while (split.pending.length > 0 && split.credit >= this.store.chunkSize) {
      const [index, id] = split.pending.shift()!;
      // A chunk the clone has rewritten since the split started is already its own.
      if (v.map.get(index) === id) this.store.copyChunk(v.map, index);
      split.copiedBytes += this.store.chunkSize;
      split.credit -= this.store.chunkSize;
    }
    if (split.pending.length === 0) {
      const clone = v.clone!;
      delete clone.split;
      this.releaseBase(v);
      delete v.clone;
    }
  }

  // ---- views (the REST representation: views.ts) ------------------------------------------------

  volumeView(v: VolumeRecord): Volume {
    return volumeView(v, this.store, this.sharedWithBase(v).length * this.store.chunkSize);
  }

  snapshotView(v: VolumeRecord, s: SnapshotRecord): Snapshot {
    return snapshotView(v, s);
  }

  jobView(j: JobRecord): Job {
    return jobView(j);
  }
}

function applies(fault: JobFault): boolean {
  return !fault.failure && !fault.stuck;
}

function busy(v: VolumeRecord): ApiError {
  return new ApiError(409, OntapCode.VOLUME_BUSY, `volume "${v.name}" is busy: a clone split is in progress`, 'uuid');
}

function stamp(): string {
  return new Date().toISOString().replace(/[-:]/g, '').replace('T', '_').slice(0, 15) + `_${randomUUID().slice(0, 4)}`;
}
