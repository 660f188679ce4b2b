import type { OpCallHandlers } from './op-call.js';
import type { BlockDevice } from '../backend/block-device.js';
import type { BackendFactory, Logger } from '../backend/plugin.js';
import type { ChangedExtents, StorageBackend } from '../backend/storage-backend.js';
import type { BrokerConfig } from '../config/config.js';
import { cloneTask, hostCopyTask, type ChangeLister, type CloneDeps, type HostCloneParams, type HostCopyParams } from '../copy/host-copy.js';
import { ExportRegistry } from '../export/registry.js';
import type { ConfiguredNbdTls } from '../export/nbd-tls.js';
import type { JobManager, StoppedRunner, Unresumable } from '../jobs/job-manager.js';
import { dropWriteIntent, mirrorAfterRestart, type MirrorParams } from '../live/mirror-task.js';
import type { FillEntry } from '../live/fill.js';
import type { JobRecord } from '../state/records.js';
import type { StateStore } from '../state/state-store.js';
import type { JobTask } from '../jobs/job-task.js';
import { sameMachine } from '../jobs/runner.js';
import { waitOutClaims } from '../jobs/op-claims.js';
import { KeyedMutex } from '../keyed-mutex.js';
import { LockManager } from '../locks/lock-manager.js';
import { ADMIN } from '../locks/principal.js';
import { FailedPrecondition, InvalidArgument, NotFound, OffloadError, toOffloadError, Unsupported } from '../model/errors.js';
import { formatRef, isSnapshotRef, parseRef, type Ref } from '../model/refs.js';
import type { Planner, PlannerBackend } from '../planner/planner.js';
import { backupTask, type BackupDeps, type BackupGroupParams, type BackupParams } from '../copy/backup-task.js';
import { exportTask, importTask, type FileExportParams, type FileImportParams, type FileJobDeps } from '../copy/file-copy.js';
import { FileFormats } from './file-formats.js';

/** What every principal's view of one broker shares: its backends, stores, locks, planner and jobs. */
export class BrokerState {
  readonly locks: LockManager;
  /** The config's lockWaitSeconds, in ms: how long a request waits in line (or for another process's answer). */
  get lockWaitMs(): number { return this.config.lockWaitSeconds !== undefined ? this.config.lockWaitSeconds * 1000 : 30_000; }
  readonly mutex = new KeyedMutex();
  /** Instant clones filling now, by target: exports of a target serve through its fill. */
  readonly fills = new Map<string, FillEntry>();
  /** Live copies are suspended, not cancelled, when the broker closes (CreateBrokerOptions.suspendLiveCopies). */
  suspendLiveCopies = false;
  /**
   * How this broker's writable exports answer what other processes ask of them (op-calls.ts): set
   * where the broker's verbs are known (createBroker). Unset, they take no call.
   */
  callHandlers: OpCallHandlers | undefined;
  closed = false;
  jobs!: JobManager;
  /**
   * Backends left out of the config that stay while this broker uses them (Broker.reconfigure):
   * their exports and jobs go on, nothing new starts on them, nor is a job of theirs taken over.
   */
  readonly draining = new Set<string>();
  /** Backends a reconfiguration replaced or took away: what still runs on them keeps them until the broker closes. */
  private readonly retired: StorageBackend[] = [];

  constructor(
    /** The config in use (Broker.reconfigure changes its backends and nbd.tls). */
    public config: BrokerConfig,
    readonly backends: Map<string, PlannerBackend>,
    readonly store: StateStore,
    readonly logger: Logger,
    readonly planner: Planner,
    /** Image file formats for `volume export|import`. */
    readonly formats: FileFormats = new FileFormats(),
    /** The NBD exports this broker serves (with the config's TLS credentials, loaded). */
    readonly exports: ExportRegistry = new ExportRegistry(),
    /** The plugins' factories by kind (the backends a reconfiguration adds), and the config's nbd.tls. */
    readonly factories: ReadonlyMap<string, BackendFactory<object>> = new Map(),
    readonly nbdTls?: ConfiguredNbdTls,
  ) {
    this.locks = new LockManager({
      outside: async (keys) => this.jobs.outsideLocks(this.store, keys),
      placeMaintenance: async (key, principal, reason) => {
        await this.store.placeMaintenance(key, principal.id, reason);
        // Brokers' cached claims made before it lapse in this time (OpClaims): no operation starts under one after this returns.
        await waitOutClaims();
      },
      removeMaintenance: (key) => this.store.removeMaintenance(key),
    }, config.lockWaitSeconds !== undefined ? config.lockWaitSeconds * 1000 : undefined, (requests) => {
      for (const r of requests) {
        const backend = r.key.slice(0, r.key.indexOf('/'));
        if (this.draining.has(backend)) {
          throw new FailedPrecondition(`backend "${backend}" is being taken out of this broker's config: it takes no new operation (those running go on)`, { ref: r.key });
        }
      }
    });
  }

  /**
   * A volume's owner record (`backend/volume`): as this broker's live claim on the volume read it
   * (nobody else can change it meanwhile: OpClaims), else from the store.
   */
  async ownerOf(ref: string): Promise<string | undefined> {
    const known = this.jobs.knownOwner(ref);
    return known === undefined ? this.store.getOwner(ref) : known ?? undefined;
  }

  /** ownerOf for many volumes: those this broker's claims do not know, in one read. */
  async ownersOf(refs: readonly string[]): Promise<Map<string, string | undefined>> {
    const out = new Map<string, string | undefined>();
    const ask: string[] = [];
    for (const ref of refs) {
      const known = this.jobs.knownOwner(ref);
      if (known === undefined) ask.push(ref);
      else out.set(ref, known ?? undefined);
    }
    const read = ask.length > 0 ? await this.store.getOwners(ask) : {};
    for (const ref of ask) out.set(ref, read[ref]);
    return out;
  }

  /**
   * Record who owns a volume. The administrators' volumes have no record (none already means
   * theirs: Access), and a write that would leave the record as this broker's claim read it is
   * not made: an administrator's create and delete then cost no statement (bench/service.ts).
   */
  setOwner(ref: string, owner: string): Promise<void> {
    return owner === ADMIN.id ? this.deleteOwner(ref) : this.writeOwner(ref, owner, () => this.store.setOwner(ref, owner));
  }

  deleteOwner(ref: string): Promise<void> {
    return this.writeOwner(ref, null, () => this.store.deleteOwner(ref));
  }

  /** A write of an owner record, and what this broker's claims know after it: the new value, or nothing if the write failed (it may have happened). */
  private async writeOwner(ref: string, owner: string | null, write: () => Promise<void>): Promise<void> {
    if (this.jobs.knownOwner(ref) === owner) return;
    try {
      await write();
    } catch (e) {
      this.jobs.noteOwner(ref, undefined);
      throw e;
    }
    this.jobs.noteOwner(ref, owner);
  }

  /** Keep a backend taken out of use open until the broker closes (closeRetired). */
  retire(backend: StorageBackend): void {
    this.retired.push(backend);
  }

  closeRetired(): Promise<unknown> {
    return Promise.allSettled(this.retired.splice(0).map((b) => b.close?.()));
  }

  assertOpen(): void {
    if (this.closed) throw new FailedPrecondition('the broker is closed');
  }

  /** A configured backend (NotFound naming the configured ones otherwise). */
  entry(name: string): PlannerBackend {
    this.assertOpen();
    const b = this.backends.get(name);
    if (!b) throw new NotFound(`backend "${name}" is not configured`, { ref: name, hint: `configured backends: ${[...this.backends.keys()].join(', ') || 'none'}` });
    return b;
  }

  /**
   * The data path of a volume (or, read-only, of a snapshot). The caller has checked the
   * capability (a plan, or the open verb); this only refuses a backend without the method.
   */
  async openDevice(ref: string, mode: 'r' | 'rw'): Promise<BlockDevice> {
    const r = parseRef(ref);
    const b = this.entry(r.backend);
    if (!b.backend.openVolume) {
      throw new Unsupported(`${r.backend} (${b.backend.kind}) has no data path: its volumes cannot be opened`, { ref });
    }
    if (isSnapshotRef(r)) {
      if (mode !== 'r' || !b.backend.openSnapshot) throw new Unsupported(`${r.backend} (${b.backend.kind}) cannot ${mode === 'r' ? 'read' : 'write'} a snapshot through its data path`, { ref });
      return call(b.backend, 'open', ref, () => b.backend.openSnapshot!(r.volume, r.snapshot));
    }
    return call(b.backend, 'open', ref, () => b.backend.openVolume!(r.volume, mode));
  }

  /**
   * A volume for a caller's own I/O (`volumes.open`): while an instant clone into it fills in this
   * broker, the fill's view, as an export of it gets (ranges not filled yet read from the source, a
   * write fills its range first; the target alone would read zeros there, and the fill would later
   * copy the source over such a write); else the volume itself.
   */
  async openThroughFill(ref: string, mode: 'r' | 'rw'): Promise<BlockDevice> {
    const filling = await this.fills.get(ref)?.ready.catch(() => undefined);
    let view: BlockDevice;
    try {
      if (!filling) return await this.openDevice(ref, mode);
      view = filling.fill.view();
    } catch (e) {
      if (filling && e instanceof FailedPrecondition) return this.openDevice(ref, mode); // the fill ended just now
      throw e;
    }
    return mode === 'r' ? readOnlyView(view, ref) : view;
  }

  /**
   * The backend's answer for `ref` (a volume: its data now; a snapshot: that point) since `since`.
   * A backend without `data.dirty` cannot say: Unsupported, with the way out.
   */
  async changes(ref: Ref, req: ChangesRequest): Promise<ChangedExtents> {
    const text = formatRef(ref);
    const b = this.entry(ref.backend);
    const since = sinceName(ref, req.since);
    if (!b.capabilities.has('data.dirty') || !b.backend.changedExtents) {
      throw new Unsupported(`${ref.backend} (${b.backend.kind}) cannot say what changed in ${ref.backend}/${ref.volume} since ${since}: it does not track changed blocks (data.dirty)`, {
        ref: text, hint: 'copy everything instead (leave out --since)',
      });
    }
    for (const [k, v] of [['offset', req.offset], ['length', req.length]] as const) {
      if (v !== undefined && (!Number.isSafeInteger(v) || v < 0)) throw new InvalidArgument(`${k} must be a whole number of bytes, got ${String(v)}`, { ref: text });
    }
    const until = isSnapshotRef(ref) ? ref.snapshot : undefined;
    if (until === since) {
      const snaps = await call(b.backend, 'list snapshots of', text, () => b.backend.listSnapshots(ref.volume));
      const snap = snaps.find((x) => x.name === since);
      if (!snap) throw new NotFound(`snapshot ${ref.backend}/${ref.volume}@${since} does not exist`, { ref: text });
      return { extents: [], granularity: 512, sizeBytes: snap.sizeBytes };
    }
    return call(b.backend, 'list the changes of', text, () => b.backend.changedExtents!(ref.volume, {
      since, ...(until !== undefined ? { until } : {}), ...(req.offset !== undefined ? { offset: req.offset } : {}), ...(req.length !== undefined ? { length: req.length } : {}),
    }));
  }

  /**
   * Whether this broker can run a stored job (undefined) or why not: brokers sharing one database
   * may configure different backends (each host its own pool), and a job that reads or writes a
   * local file belongs to the host that has it.
   */
  placement(rec: JobRecord): string | undefined {
    for (const l of rec.locks) {
      if (l.key.startsWith('file:')) {
        if (rec.runnerHost !== '' && !sameMachine(rec.runnerHost, this.jobs.host) && !this.jobs.ranHere(rec)) return `it uses the file ${l.key.slice('file:'.length)} on ${rec.runnerHost}`;
        continue;
      }
      const backend = l.key.slice(0, l.key.indexOf('/'));
      if (!this.backends.has(backend) || this.draining.has(backend)) return `it works on backend "${backend}", which this broker does not configure`;
    }
    if (rec.backend !== undefined && (!this.backends.has(rec.backend) || this.draining.has(rec.backend))) return `it runs on backend "${rec.backend}", which this broker does not configure`;
    return undefined;
  }

  /**
   * Take away the write-intent records of the concluded live copies that copied `volume` (as
   * source or target; or any of several): it is about to be written in a way they cannot account
   * for. `before`: only those of copies started before then.
   */
  async dropCrashIntents(volume: string | readonly string[], why = 'exported writable without it', before?: string): Promise<void> {
    const volumes = new Set(typeof volume === 'string' ? [volume] : volume);
    for (const rec of await this.store.listJobs({ type: 'mirror' })) {
      if (rec.type !== 'mirror' || rec.status !== 'concluded' || (rec.checkpoint as { intent?: unknown } | undefined)?.intent === undefined) continue;
      if (before !== undefined && rec.createdAt >= before) continue;
      const hit = ((rec.params as unknown as MirrorParams).pairs ?? []).flatMap((p) => [p.source, p.target]).find((v) => volumes.has(v));
      if (hit === undefined) continue;
      await dropWriteIntent(this.store, rec.id);
      this.logger.info(`live copy ${rec.id} can no longer be resumed from its write-intent record: ${hit} is ${why}`, { job: rec.id });
    }
  }

  /**
   * Whether a concluded job's record is still a way on, kept by the sweep of old jobs: a live
   * copy not resumed yet that left points (snapshots of its sources, which its resumption or
   * cancellation deletes) or a write-intent record.
   */
  resumable(rec: JobRecord): boolean {
    if (rec.type !== 'mirror') return false;
    const state = rec.checkpoint as { points?: (string | null)[]; intent?: unknown; resumedBy?: string } | undefined;
    // As LiveCopies.resumeOf takes them: a write-intent record of one not cancelled, or its points.
    return state?.resumedBy === undefined && ((state?.intent !== undefined && !rec.cancelled) || (state?.points ?? []).some((p) => p !== null));
  }

  /**
   * A job's record is about to be dismissed. A crashed live copy is resumed only if no job wrote
   * its volumes after it — a later live copy of them, or a job that held one exclusively — which
   * the records tell (LiveCopies.assertUnchangedSince): the copies older than this job that it
   * would refuse lose their write-intent records first, so that the record's going cannot let one
   * resume over what this job wrote.
   */
  async beforeDismiss(rec: JobRecord): Promise<void> {
    const wrote = rec.type === 'mirror'
      ? ((rec.params as unknown as MirrorParams).pairs ?? []).flatMap((p) => [p.source, p.target])
      : rec.locks.filter((l) => l.mode === 'exclusive').map((l) => l.key);
    if (wrote.length > 0) await this.dropCrashIntents(wrote, `written by job ${rec.id} (dismissed)`, rec.createdAt);
  }

  /** Rebuild a stored job's task after a restart (undefined: it cannot be resumed). */
  async resolveTask(rec: JobRecord, stopped: StoppedRunner): Promise<JobTask | Unresumable | undefined> {
    if (rec.type === 'mirror') return mirrorAfterRestart(rec, stopped);
    const open = (ref: string, mode: 'r' | 'rw') => this.openDevice(ref, mode);
    if (rec.executor === 'host' && rec.type === 'copy') return hostCopyTask(rec.params as HostCopyParams, open, this.changeLister());
    if (rec.executor === 'host' && rec.type === 'clone') return cloneTask(rec.params as HostCloneParams, this.cloneDeps());
    if (rec.executor === 'host' && rec.type === 'backup') return backupTask(rec.params as BackupParams | BackupGroupParams, this.backupDeps());
    if (rec.executor === 'host' && rec.type === 'export') return exportTask(rec.params as FileExportParams, this.fileJobDeps());
    if (rec.executor === 'host' && rec.type === 'import') return importTask(rec.params as FileImportParams, this.fileJobDeps());
    const b = rec.backend ? this.backends.get(rec.backend) : undefined;
    if (!b?.backend.resumeTask) return undefined;
    return b.backend.resumeTask(rec.type, rec.params);
  }

  /** What an incremental copy asks: the changed ranges of a source since its snapshot. */
  changeLister(): ChangeLister {
    return async (source, since) => {
      const ref = parseRef(source);
      const answer = await this.changes(ref, { since });
      // Grown since: the target holds nothing defined past the old end (it may be larger than
      // the snapshot it was a copy of), so that part is copied too, zeros included.
      const b = this.entry(ref.backend).backend;
      const old = (await call(b, 'list snapshots of', source, () => b.listSnapshots(ref.volume))).find((x) => x.name === since)?.sizeBytes;
      if (old === undefined || old >= answer.sizeBytes) return answer.extents;
      const kept = answer.extents.flatMap((e) => (e.offset >= old ? [] : [{ offset: e.offset, length: Math.min(e.length, old - e.offset) }]));
      return [...kept, { offset: old, length: answer.sizeBytes - old }];
    };
  }

  /** What a backup job does to volumes and snapshots (core/copy/backup-task.ts), straight on the backends. */
  backupDeps(): BackupDeps {
    const on = (ref: string) => {
      const r = parseRef(ref);
      return { r, b: this.entry(r.backend).backend };
    };
    const clone = this.cloneDeps();
    const snap = (ref: string) => {
      const { r, b } = on(ref);
      if (!isSnapshotRef(r)) throw new InvalidArgument(`${ref} is not a snapshot ref`);
      return { r, b };
    };
    return {
      open: (ref, mode) => this.openDevice(ref, mode),
      changes: this.changeLister(),
      size: async (ref) => {
        const { r, b } = on(ref);
        return (await call(b, 'get', ref, () => b.getVolume(r.volume)))?.sizeBytes;
      },
      create: (ref, size, owner) => clone.create(ref, size, owner),
      resize: async (ref, size) => {
        const { r, b } = on(ref);
        await call(b, 'resize', ref, () => b.resizeVolume(r.volume, size));
      },
      snapshot: async (ref) => {
        const { r, b } = snap(ref);
        await call(b, 'snapshot', ref, () => b.createSnapshot(r.volume, r.snapshot));
      },
      deleteSnapshot: async (ref) => {
        const { r, b } = snap(ref);
        await call(b, 'delete', ref, () => b.deleteSnapshot(r.volume, r.snapshot));
      },
      revert: async (ref) => {
        const { r, b } = snap(ref);
        await call(b, 'revert', ref, () => b.revertVolume(r.volume, r.snapshot));
      },
      remove: (ref) => clone.remove(ref),
    };
  }

  /** What `volume export|import` need from the broker: data paths, image formats, and making a volume. */
  fileJobDeps(): FileJobDeps {
    return { open: (ref, mode) => this.openDevice(ref, mode), format: (name) => this.formats.get(name), volumes: this.cloneDeps() };
  }

  /** What a clone through the host needs from the broker: create and delete the target, open data paths. */
  cloneDeps(): CloneDeps {
    const backendOf = (ref: string) => {
      const r = parseRef(ref);
      return { r, b: this.entry(r.backend).backend };
    };
    return {
      open: (ref, mode) => this.openDevice(ref, mode),
      find: async (ref) => {
        const { r, b } = backendOf(ref);
        return call(b, 'get', ref, () => b.getVolume(r.volume));
      },
      create: async (ref, sizeBytes, owner) => {
        const { r, b } = backendOf(ref);
        const vol = await call(b, 'create', ref, () => b.createVolume({ name: r.volume, sizeBytes, owner }));
        await this.setOwner(ref, owner);
        return vol;
      },
      own: (ref, owner) => this.setOwner(ref, owner),
      remove: async (ref) => {
        const { r, b } = backendOf(ref);
        await call(b, 'delete', ref, () => b.deleteVolume(r.volume));
        await this.deleteOwner(ref);
      },
    };
  }
}

export interface ChangesRequest {
  /** The earlier point: a snapshot name of the volume (or its full ref `backend/volume@snapshot`). */
  since: string;
  offset?: number;
  length?: number;
}

/** The snapshot name `since` gives, checked to be of the volume `ref` names. */
export function sinceName(ref: Ref, since: unknown): string {
  if (typeof since !== 'string' || since === '') throw new InvalidArgument('since names a snapshot of the source volume', { ref: formatRef(ref) });
  if (!since.includes('@') && !since.includes('/')) return since;
  const r = parseRef(since.includes('/') ? since : `${ref.backend}/${since}`);
  if (!isSnapshotRef(r) || r.backend !== ref.backend || r.volume !== ref.volume) {
    throw new InvalidArgument(`since must be a snapshot of ${ref.backend}/${ref.volume}, got ${since}`, { ref: formatRef(ref) });
  }
  return r.snapshot;
}

/** Run a backend call; anything untyped it throws becomes an Internal error naming the call. */
export async function call<T>(backend: StorageBackend, what: string, ref: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof OffloadError) throw e;
    throw toOffloadError(e, `${backend.name} (${backend.kind}) failed to ${what} ${ref}`);
  }
}

/** A fill's view opened "r": writes refused as a volume opened read-only refuses them. */
function readOnlyView(d: BlockDevice, ref: string): BlockDevice {
  const refuse = async (): Promise<never> => {
    throw new FailedPrecondition(`${ref} is open read-only`, { ref });
  };
  return {
    sizeBytes: d.sizeBytes,
    ...(d.blockSize !== undefined ? { blockSize: d.blockSize } : {}),
    read: (o, l, opts) => d.read(o, l, opts),
    extents: (o, l) => d.extents(o, l),
    flush: () => d.flush(),
    close: () => d.close(),
    write: refuse,
    writeFua: refuse,
    writeZeroes: refuse,
    discard: refuse,
  };
}
