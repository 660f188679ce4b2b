/** The broker's volume and snapshot verbs for one principal: planned, locked, and checked for ownership. */
import type { BlockDevice } from '../backend/block-device.js';
import type { SnapshotsApi, VolumesApi } from '../broker-api.js';
import { BackendUnavailable, InvalidArgument, OutOfRange } from '../model/errors.js';
import { parseRef, parseSnapshotRef, parseVolumeRef, snapshotKey, volumeKey, type SnapshotRef } from '../model/refs.js';
import type { Page, PageRequest, Snapshot, Volume } from '../model/types.js';
import { notFoundVolume, type Access } from './access.js';
import { askServingProcess, GONE } from './op-calls.js';
import { checkSize, need, planOrRefuse, runShort, sparesDisksInUse } from './operation.js';
import { call, type BrokerState, type ChangesRequest } from './state.js';
import type { FileExportOptions, FileImportOptions } from '../broker-api.js';
import type { Job } from '../jobs/job.js';
import { FileJobs } from './file-jobs.js';
import type { ChangedExtents } from '../backend/storage-backend.js';

/** The volume verbs of one principal's broker view. */
export class Volumes implements VolumesApi {
  constructor(private readonly s: BrokerState, private readonly a: Access) {}

  async create(refText: string, o: { sizeBytes: number; owner?: string }): Promise<Volume> {
    const ref = parseVolumeRef(refText);
    planOrRefuse(this.s, { op: 'create', ref: refText, sizeBytes: o?.sizeBytes }, `create ${refText}`, refText);
    const b = this.s.entry(ref.backend);
    const size = checkSize(o?.sizeBytes, refText, b.capabilities);
    const owner = this.a.ownerFor(o?.owner);
    return runShort(this.s, this.a.principal, [{ key: volumeKey(ref), mode: 'exclusive' }], `create ${refText}`, async () => {
      const recorded = await this.a.targetOwner(ref, b.backend, owner, o?.owner !== undefined);
      const vol = await call(b.backend, 'create', refText, () => b.backend.createVolume({ name: ref.volume, sizeBytes: size, owner: recorded }));
      await this.s.setOwner(volumeKey(ref), recorded);
      return { ...vol, owner: recorded };
    });
  }

  async get(refText: string): Promise<Volume> {
    const ref = parseVolumeRef(refText);
    const b = this.s.entry(ref.backend);
    const vol = await call(b.backend, 'get', refText, () => b.backend.getVolume(ref.volume));
    if (!vol || !(await this.a.mayAccess(ref))) throw notFoundVolume(refText);
    return await this.a.withOwner(vol);
  }

  async list(backend: string, page?: PageRequest): Promise<Page<Volume>> {
    const b = need(this.s, backend, 'volume.list');
    if (page?.limit !== undefined && (!Number.isInteger(page.limit) || page.limit < 1)) {
      throw new InvalidArgument(`page limit must be a positive integer, got ${page.limit}`);
    }
    const res = await call(b.backend, 'list', backend, () => b.backend.listVolumes(page));
    const items = await this.a.visible(backend, res.items);
    return res.next === undefined ? { items } : { items, next: res.next };
  }

  async listAll(backend: string): Promise<Volume[]> {
    const out: Volume[] = [];
    let token: string | undefined;
    const seen = new Set<string>();
    do {
      const page = await this.list(backend, token === undefined ? undefined : { token });
      out.push(...page.items);
      if (page.next !== undefined && seen.has(page.next)) throw new BackendUnavailable(`${backend} returned the same page token twice while listing volumes`, { ref: backend });
      if (page.next !== undefined) seen.add(page.next);
      token = page.next;
    } while (token !== undefined);
    return out;
  }

  async resize(refText: string, sizeBytes: number): Promise<Volume> {
    const ref = parseVolumeRef(refText);
    planOrRefuse(this.s, { op: 'resize', ref: refText, sizeBytes }, `resize ${refText}`, refText);
    const b = this.s.entry(ref.backend);
    const size = checkSize(sizeBytes, refText, b.capabilities);
    await this.a.assertOwns(ref);
    return runShort(this.s, this.a.principal, [{ key: volumeKey(ref), mode: 'exclusive' }], `resize ${refText}`, async () => {
      await this.a.assertOwns(ref); // again under the lock: the volume may have changed hands while this waited for it
      const vol = await call(b.backend, 'get', refText, () => b.backend.getVolume(ref.volume));
      if (!vol) throw notFoundVolume(refText);
      if (size < vol.sizeBytes) {
        throw new OutOfRange(`cannot shrink ${refText} from ${vol.sizeBytes} to ${size} bytes`, { ref: refText, hint: 'volumes can only grow' });
      }
      return await this.a.withOwner(await call(b.backend, 'resize', refText, () => b.backend.resizeVolume(ref.volume, size)));
    });
  }

  async delete(refText: string): Promise<void> {
    const ref = parseVolumeRef(refText);
    planOrRefuse(this.s, { op: 'delete', ref: refText }, `delete ${refText}`, refText);
    const b = this.s.entry(ref.backend);
    if (!(await this.a.mayAccess(ref))) return; // a tenant deleting what it cannot see: as if gone, nothing changes
    await runShort(this.s, this.a.principal, [{ key: volumeKey(ref), mode: 'exclusive' }], `delete ${refText}`, async () => {
      // Again under the lock: deleted and made again by someone else while this waited, it is not this tenant's.
      if (!(await this.a.mayAccess(ref))) return;
      await call(b.backend, 'delete', refText, () => b.backend.deleteVolume(ref.volume));
      await this.s.deleteOwner(volumeKey(ref));
    });
  }

  async changes(refText: string, req: ChangesRequest): Promise<ChangedExtents> {
    if (req === null || typeof req !== 'object') throw new InvalidArgument('changes takes { since, offset?, length? }');
    const ref = parseRef(refText);
    this.s.entry(ref.backend);
    if (!(await this.a.mayAccess(ref))) throw notFoundVolume(`${ref.backend}/${ref.volume}`);
    return this.s.changes(ref, req);
  }

  async open(refText: string, mode: 'r' | 'rw' = 'r'): Promise<BlockDevice> {
    if (mode !== 'r' && mode !== 'rw') throw new InvalidArgument(`open mode must be "r" or "rw", got ${String(mode)}`);
    const ref = parseVolumeRef(refText);
    this.s.entry(ref.backend);
    await this.a.assertOwns(ref);
    need(this.s, ref.backend, mode === 'r' ? 'data.read' : 'data.write');
    // Written through no export or job: a crashed live copy's record could not account for it.
    if (mode === 'rw') await this.s.dropCrashIntents(volumeKey(ref), 'opened for writing (volumes.open)');
    return this.s.openThroughFill(volumeKey(ref), mode);
  }

  exportTo(refText: string, file: string, opts?: FileExportOptions): Promise<Job> {
    return new FileJobs(this.s, this.a, this).exportTo(refText, file, opts);
  }

  importFrom(file: string, refText: string, opts?: FileImportOptions): Promise<Job> {
    return new FileJobs(this.s, this.a, this).importFrom(file, refText, opts);
  }
}

/** The snapshot verbs of one principal's broker view. */
export class Snapshots implements SnapshotsApi {
  constructor(private readonly s: BrokerState, private readonly a: Access) {}

  create(refText: string): Promise<Snapshot> {
    return this.take(refText, 1);
  }

  /** `retries`: times to take it again when the export of another process that was asked ended first. */
  private async take(refText: string, retries: number): Promise<Snapshot> {
    const ref = parseSnapshotRef(refText);
    planOrRefuse(this.s, { op: 'snapshot', ref: refText }, `snapshot ${refText}`, refText);
    const b = this.s.entry(ref.backend);
    await this.a.assertOwns(ref);
    // A volume this broker exports read-write (a disk in use) can be snapshotted here, within the
    // export's lock: the backend takes a crash-consistent point (the pool swaps its open image).
    try {
      return await runShort(this.s, this.a.principal, [{ key: volumeKey(ref), mode: 'shared' }], `snapshot ${refText}`, async () => {
        await this.a.assertOwns(ref); // again under the lock (Volumes.resize)
        return call(b.backend, 'snapshot', refText, () => b.backend.createSnapshot(ref.volume, ref.snapshot));
      }, this.servingHere(ref), { spares: sparesDisksInUse });
    } catch (e) {
      if (retries < 0) throw e;
      const answer = await askServingProcess(this.s, e, { kind: 'snapshot', ref: refText }, this.a.principal, `snapshot ${refText}`);
      // Its export ended before it answered: its lock is gone, so the snapshot is taken here.
      return answer === GONE ? this.take(refText, retries - 1) : answer as Snapshot;
    }
  }

  /** The holders of this process's exports of the volume of `ref`: a snapshot is made (or deleted) within their locks. */
  private servingHere(ref: SnapshotRef): string[] {
    const volume = `${ref.backend}/${ref.volume}`;
    return this.s.exports.list().filter((e) => e.ref === volume).map((e) => this.s.exports.device(e.name)?.holder)
      .filter((h): h is string => h !== undefined);
  }

  async list(refText: string): Promise<Snapshot[]> {
    const ref = parseVolumeRef(refText);
    const b = need(this.s, ref.backend, 'snapshot.create');
    if (!(await this.a.mayAccess(ref))) throw notFoundVolume(refText);
    return call(b.backend, 'list snapshots of', refText, () => b.backend.listSnapshots(ref.volume));
  }

  delete(refText: string): Promise<void> {
    return this.drop(refText, 1);
  }

  /** `retries` as take's. */
  private async drop(refText: string, retries: number): Promise<void> {
    const ref = parseSnapshotRef(refText);
    planOrRefuse(this.s, { op: 'delete', ref: refText }, `delete ${refText}`, refText);
    const b = this.s.entry(ref.backend);
    if (!(await this.a.mayAccess(ref))) return;
    // A snapshot of a disk in use is deleted within its export's lock, as one is taken (the pool
    // commits the open image down into its layer, or merges the layer up, while the guest writes;
    // an array drops it).
    const locks = [{ key: volumeKey(ref), mode: 'shared' as const }, { key: snapshotKey(ref), mode: 'exclusive' as const }];
    try {
      await runShort(this.s, this.a.principal, locks, `delete ${refText}`, async () => {
        if (!(await this.a.mayAccess(ref))) return; // again under the lock (Volumes.delete)
        await call(b.backend, 'delete', refText, () => b.backend.deleteSnapshot(ref.volume, ref.snapshot));
      }, this.servingHere(ref), { spares: sparesDisksInUse });
    } catch (e) {
      if (retries < 0) throw e;
      const answer = await askServingProcess(this.s, e, { kind: 'snapshot.delete', ref: refText }, this.a.principal, `delete ${refText}`);
      if (answer === GONE) await this.drop(refText, retries - 1);
    }
  }

  async revert(refText: string): Promise<void> {
    const ref = parseSnapshotRef(refText);
    planOrRefuse(this.s, { op: 'revert', ref: refText }, `revert ${refText}`, refText);
    const b = this.s.entry(ref.backend);
    await this.a.assertOwns(ref);
    await runShort(this.s, this.a.principal, [{ key: volumeKey(ref), mode: 'exclusive' }], `revert ${refText}`, async () => {
      await this.a.assertOwns(ref); // again under the lock (Volumes.resize)
      // A live copy whose service died could not account for this change: its record goes first.
      await this.s.dropCrashIntents(volumeKey(ref), 'reverted');
      await call(b.backend, 'revert', refText, () => b.backend.revertVolume(ref.volume, ref.snapshot));
    });
  }
}
