import { randomBytes } from 'node:crypto';
import { accessSync, constants, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { ContainerModule } from 'inversify';
import type { BlockDevice } from './backend/block-device.js';
import type { Logger } from './backend/plugin.js';
import { loadPlugins } from './backend/plugin-container.js';
import type { StorageBackend } from './backend/storage-backend.js';
import type { BackendInfo, Broker, CloneOptions, JobsApi, LocksApi, SnapshotsApi, VolumesApi } from './broker-api.js';
import { loadConfig, validateConfig, type BrokerConfig, type RawConfig } from './config/config.js';
import { ConfigError } from './config/config-error.js';
import { secrets } from './config/secrets.js';
import { JobManager } from './jobs/job-manager.js';
import { JobStore, type JobRecord } from './jobs/job-store.js';
import type { Job, JobInfo } from './jobs/job.js';
import type { JobTask } from './jobs/job-task.js';
import { KeyedMutex } from './keyed-mutex.js';
import { LockManager, type LockLease, type LockRequest } from './locks/lock-manager.js';
import { ADMIN, tenant, type Principal } from './locks/principal.js';
import { createLogger } from './logger.js';
import type { Capability, CapabilitySet } from './model/capabilities.js';
import {
  AlreadyExists, BackendUnavailable, errorFromCode, FailedPrecondition, InvalidArgument, NotFound, OffloadError, OutOfRange, PermissionDenied,
  Unsupported, toOffloadError,
} from './model/errors.js';
import { formatRef, isSnapshotRef, parseRef, parseSnapshotRef, parseVolumeRef, volumeKey, type VolumeRef } from './model/refs.js';
import type { Page, PageRequest, Snapshot, Volume } from './model/types.js';
import type { Operation, Plan } from './planner/plan.js';
import { Planner, type PlannerBackend } from './planner/planner.js';
import { hostCopyTask, type HostCopyParams } from './copy/host-copy.js';

export interface CreateBrokerOptions {
  /** Plugin modules (e.g. `builtinPlugins` from plugins/index.ts). */
  plugins: readonly ContainerModule[];
  /** Who acts (default: the administrator). */
  principal?: Principal;
  logger?: Logger;
  /** Environment for `${VAR}` references (default process.env). */
  env?: NodeJS.ProcessEnv;
  /** Resume or fail jobs left by a previous process (default true). */
  recoverJobs?: boolean;
}

/** Largest size the broker accepts before asking the backend: a safe integer. */
const MAX_SAFE_SIZE = Number.MAX_SAFE_INTEGER;

/** The broker's shared state; each principal gets its own view (BrokerView). */
class BrokerState {
  readonly locks: LockManager;
  readonly mutex = new KeyedMutex();
  closed = false;
  constructor(
    readonly config: BrokerConfig,
    readonly backends: Map<string, PlannerBackend>,
    readonly store: JobStore,
    readonly logger: Logger,
    readonly planner: Planner,
    public jobs: JobManager,
  ) {
    this.locks = new LockManager({
      foreign: () => (this.jobs ? this.jobs.foreignLocks() : []),
      maintenance: () => this.store.listMaintenance().map((m) => ({ key: m.key, reason: m.reason, principal: { id: m.principal, role: 'admin' as const } })),
      placeMaintenance: (key, principal, reason) => this.store.placeMaintenance(key, principal.id, reason),
      removeMaintenance: (key) => this.store.removeMaintenance(key),
    });
  }
}

/**
 * Build a broker: load the plugins, validate the config (a path, a raw object or an already
 * validated config), create one backend per entry, open the job store and recover its jobs.
 */
export async function createBroker(config: string | RawConfig | BrokerConfig, opts: CreateBrokerOptions): Promise<Broker> {
  const logger = opts.logger ?? createLogger();
  const { factories } = await loadPlugins(opts.plugins);
  const validated = typeof config === 'string'
    ? loadConfig(config, factories, opts.env)
    : 'baseDir' in config && typeof (config as BrokerConfig).baseDir === 'string' && typeof (config as BrokerConfig).state === 'string'
      ? validateConfig({ state: (config as BrokerConfig).state, backends: config.backends }, factories, { baseDir: (config as BrokerConfig).baseDir, env: opts.env })
      : validateConfig(config, factories, { env: opts.env });

  prepareStateDir(validated.state);
  const byKind = new Map(factories.map((f) => [f.kind, f]));
  const backends = new Map<string, PlannerBackend>();
  const store = new JobStore(join(validated.state, 'jobs.sqlite'));
  try {
    for (const entry of validated.backends) {
      const factory = byKind.get(entry.kind)!;
      let backend: StorageBackend;
      try {
        backend = await factory.create(entry, { stateDir: validated.state, baseDir: validated.baseDir, logger });
      } catch (e) {
        const err = toOffloadError(e);
        throw new ConfigError(secrets.redact(`backend "${entry.name}" (${entry.kind}) cannot start: ${err.message}`), err.hint);
      }
      const capabilities = await backend.capabilities();
      backends.set(entry.name, { backend, capabilities });
    }
  } catch (e) {
    await Promise.allSettled([...backends.values()].map((b) => b.backend.close?.()));
    store.close();
    throw e;
  }
  const planner = new Planner(backends);
  const state = new BrokerState(validated, backends, store, logger, planner, undefined as unknown as JobManager);
  state.jobs = new JobManager(store, state.locks, (rec) => resolveTask(state, rec), logger);
  const broker = new BrokerView(state, opts.principal ?? ADMIN);
  if (opts.recoverJobs !== false) {
    try {
      await state.jobs.recover();
    } catch (e) {
      await broker.close();
      throw e;
    }
  }
  return broker;
}

function prepareStateDir(dir: string): void {
  try {
    mkdirSync(dir, { recursive: true });
    accessSync(dir, constants.W_OK);
  } catch (e) {
    throw new ConfigError(`state: cannot use ${dir} as the broker's state directory: ${(e as Error).message}`, 'set `state:` in the config to a writable folder');
  }
}

/** Rebuild a stored job's task after a restart. */
async function resolveTask(state: BrokerState, rec: JobRecord): Promise<JobTask | undefined> {
  if (rec.executor === 'host' && rec.type === 'copy') {
    return hostCopyTask(rec.params as HostCopyParams, (ref, mode) => openDevice(state, ref, mode));
  }
  const b = rec.backend ? state.backends.get(rec.backend) : undefined;
  if (!b?.backend.resumeTask) return undefined;
  return b.backend.resumeTask(rec.type, rec.params);
}

async function openDevice(state: BrokerState, ref: string, mode: 'r' | 'rw'): Promise<BlockDevice> {
  const r = parseRef(ref);
  const b = state.backends.get(r.backend);
  if (!b) throw new NotFound(`backend "${r.backend}" is not configured`, { ref });
  const cap = mode === 'r' ? 'data.read' : 'data.write';
  if (!b.capabilities.has(cap) || !b.backend.openVolume) {
    throw new Unsupported(`${r.backend} (${b.backend.kind}) has no ${cap}: its volumes cannot be opened ${mode === 'r' ? 'for reading' : 'for writing'}`, { ref });
  }
  if (isSnapshotRef(r)) {
    if (mode !== 'r' || !b.backend.openSnapshot) throw new Unsupported(`${r.backend} (${b.backend.kind}) cannot ${mode === 'r' ? 'read' : 'write'} a snapshot through its data path`, { ref });
    return b.backend.openSnapshot(r.volume, r.snapshot);
  }
  return b.backend.openVolume(r.volume, mode);
}

class BrokerView implements Broker {
  readonly volumes: VolumesApi;
  readonly snapshots: SnapshotsApi;
  readonly jobs: JobsApi;
  readonly locks: LocksApi;

  constructor(private readonly s: BrokerState, readonly principal: Principal) {
    this.volumes = {
      create: (ref, o) => this.createVolume(ref, o),
      get: (ref) => this.getVolume(ref),
      list: (backend, page) => this.listVolumes(backend, page),
      listAll: (backend) => this.listAllVolumes(backend),
      resize: (ref, size) => this.resizeVolume(ref, size),
      delete: (ref) => this.deleteVolume(ref),
      open: (ref, mode) => this.openVolume(ref, mode ?? 'r'),
    };
    this.snapshots = {
      create: (ref) => this.createSnapshot(ref),
      list: (ref) => this.listSnapshots(ref),
      delete: (ref) => this.deleteSnapshot(ref),
      revert: (ref) => this.revert(ref),
    };
    this.jobs = {
      list: (f) => this.listJobs(f),
      get: (id) => this.job(id),
      cancel: (id) => this.jobVerb(id, (j) => j.cancel()),
      pause: (id) => this.jobVerb(id, (j) => j.pause()),
      resume: (id) => this.jobVerb(id, (j) => j.resume()),
      complete: (id) => this.jobVerb(id, (j) => j.complete()),
      dismiss: (id) => this.jobVerb(id, (j) => j.dismiss()),
      setSpeed: (id, speed) => this.jobVerb(id, (j) => j.setSpeed(speed)),
      wait: (id) => this.job(id).wait(),
    };
    const leases = new Map<string, LockLease>();
    this.locks = {
      maintenance: (ref, reason) => {
        const key = volumeKey(parseVolumeRef(ref));
        leases.set(key, this.s.locks.placeMaintenance(key, this.principal, reason));
      },
      release: (ref) => {
        const key = volumeKey(parseVolumeRef(ref));
        this.s.locks.breakMaintenance(key, this.principal);
        leases.delete(key);
      },
      list: () => this.s.locks.list().filter((l) => this.principal.role === 'admin' || this.s.store.getOwner(l.key) === this.principal.id),
    };
  }

  as(principal: Principal): Broker {
    if (principal?.role !== 'admin' && principal?.role !== 'tenant') throw new InvalidArgument('a principal is { id, role: "admin" | "tenant" }');
    return new BrokerView(this.s, principal.role === 'tenant' ? tenant(principal.id) : principal);
  }

  async backends(): Promise<BackendInfo[]> {
    this.open();
    return [...this.s.backends.entries()].map(([name, b]) => ({ name, kind: b.backend.kind, capabilities: b.capabilities }));
  }

  backend(name: string): StorageBackend {
    return this.entry(name).backend;
  }

  // ---- volumes ----

  private async createVolume(refText: string, o: { sizeBytes: number; owner?: string }): Promise<Volume> {
    const ref = parseVolumeRef(refText);
    const b = this.need(ref.backend, 'volume.create');
    const size = checkSize(o?.sizeBytes, refText, b.capabilities);
    const owner = this.ownerFor(o?.owner);
    return this.short([{ key: volumeKey(ref), mode: 'exclusive' }], `create ${refText}`, async () => {
      const recorded = await this.targetOwner(ref, b.backend, owner, o?.owner !== undefined);
      const vol = await call(b.backend, 'create', refText, () => b.backend.createVolume({ name: ref.volume, sizeBytes: size, owner: recorded }));
      this.s.store.setOwner(volumeKey(ref), recorded);
      return { ...vol, owner: recorded };
    });
  }

  /**
   * The owner a create or clone into `ref` records. Creating is idempotent, so the name may exist:
   * then it keeps its owner, and nobody else's create may return it (AlreadyExists). A volume made
   * outside the broker (no owner recorded) belongs to the administrators.
   */
  private async targetOwner(ref: VolumeRef, backend: StorageBackend, owner: string, explicit: boolean): Promise<string> {
    const refText = volumeKey(ref);
    const existing = this.s.store.getOwner(refText);
    if (existing !== undefined) {
      if (existing === owner || (this.principal.role === 'admin' && !explicit)) return existing;
      throw new AlreadyExists(`${refText} already exists and belongs to ${this.principal.role === 'admin' ? existing : 'someone else'}`, { ref: refText, hint: 'choose another name' });
    }
    if (this.principal.role === 'tenant' && (await call(backend, 'get', refText, () => backend.getVolume(ref.volume)))) {
      throw new AlreadyExists(`${refText} already exists and belongs to someone else`, { ref: refText, hint: 'choose another name' });
    }
    return owner;
  }

  private async getVolume(refText: string): Promise<Volume> {
    const ref = parseVolumeRef(refText);
    const b = this.entry(ref.backend);
    const vol = await call(b.backend, 'get', refText, () => b.backend.getVolume(ref.volume));
    if (!vol || !this.mayAccess(ref)) throw notFoundVolume(refText);
    return this.withOwner(vol);
  }

  private async listVolumes(backend: string, page?: PageRequest): Promise<Page<Volume>> {
    const b = this.need(backend, 'volume.list');
    if (page?.limit !== undefined && (!Number.isInteger(page.limit) || page.limit < 1)) {
      throw new InvalidArgument(`page limit must be a positive integer, got ${page.limit}`);
    }
    const res = await call(b.backend, 'list', backend, () => b.backend.listVolumes(page));
    const items = res.items.filter((v) => this.mayAccess({ backend, volume: v.name })).map((v) => this.withOwner(v));
    return res.next === undefined ? { items } : { items, next: res.next };
  }

  private async listAllVolumes(backend: string): Promise<Volume[]> {
    const out: Volume[] = [];
    let token: string | undefined;
    const seen = new Set<string>();
    do {
      const page = await this.listVolumes(backend, token === undefined ? undefined : { token });
      out.push(...page.items);
      if (page.next !== undefined && seen.has(page.next)) throw new BackendUnavailable(`${backend} returned the same page token twice while listing volumes`, { ref: backend });
      if (page.next !== undefined) seen.add(page.next);
      token = page.next;
    } while (token !== undefined);
    return out;
  }

  private async resizeVolume(refText: string, sizeBytes: number): Promise<Volume> {
    const ref = parseVolumeRef(refText);
    const b = this.need(ref.backend, 'volume.resize');
    const size = checkSize(sizeBytes, refText, b.capabilities);
    this.assertOwns(ref);
    return this.short([{ key: volumeKey(ref), mode: 'exclusive' }], `resize ${refText}`, async () => {
      const vol = await call(b.backend, 'get', refText, () => b.backend.getVolume(ref.volume));
      if (!vol) throw notFoundVolume(refText);
      if (size < vol.sizeBytes) {
        throw new OutOfRange(`cannot shrink ${refText} from ${vol.sizeBytes} to ${size} bytes`, { ref: refText, hint: 'volumes can only grow' });
      }
      return this.withOwner(await call(b.backend, 'resize', refText, () => b.backend.resizeVolume(ref.volume, size)));
    });
  }

  private async deleteVolume(refText: string): Promise<void> {
    const ref = parseVolumeRef(refText);
    const b = this.need(ref.backend, 'volume.delete');
    if (!this.mayAccess(ref)) return; // a tenant deleting what it cannot see: as if gone, nothing changes
    await this.short([{ key: volumeKey(ref), mode: 'exclusive' }], `delete ${refText}`, async () => {
      await call(b.backend, 'delete', refText, () => b.backend.deleteVolume(ref.volume));
      this.s.store.deleteOwner(volumeKey(ref));
    });
  }

  private async openVolume(refText: string, mode: 'r' | 'rw'): Promise<BlockDevice> {
    if (mode !== 'r' && mode !== 'rw') throw new InvalidArgument(`open mode must be "r" or "rw", got ${String(mode)}`);
    const ref = parseVolumeRef(refText);
    this.entry(ref.backend);
    this.assertOwns(ref);
    return openDevice(this.s, refText, mode);
  }

  // ---- snapshots ----

  private async createSnapshot(refText: string): Promise<Snapshot> {
    const ref = parseSnapshotRef(refText);
    const b = this.need(ref.backend, 'snapshot.create');
    this.assertOwns(ref);
    return this.short([{ key: volumeKey(ref), mode: 'shared' }], `snapshot ${refText}`, () =>
      call(b.backend, 'snapshot', refText, () => b.backend.createSnapshot(ref.volume, ref.snapshot)));
  }

  private async listSnapshots(refText: string): Promise<Snapshot[]> {
    const ref = parseVolumeRef(refText);
    const b = this.need(ref.backend, 'snapshot.create');
    if (!this.mayAccess(ref)) throw notFoundVolume(refText);
    return call(b.backend, 'list snapshots of', refText, () => b.backend.listSnapshots(ref.volume));
  }

  private async deleteSnapshot(refText: string): Promise<void> {
    const ref = parseSnapshotRef(refText);
    const b = this.need(ref.backend, 'snapshot.delete');
    if (!this.mayAccess(ref)) return;
    await this.short([{ key: volumeKey(ref), mode: 'shared' }], `delete ${refText}`, () =>
      call(b.backend, 'delete', refText, () => b.backend.deleteSnapshot(ref.volume, ref.snapshot)));
  }

  private async revert(refText: string): Promise<void> {
    const ref = parseSnapshotRef(refText);
    const b = this.need(ref.backend, 'snapshot.revert');
    this.assertOwns(ref);
    await this.short([{ key: volumeKey(ref), mode: 'exclusive' }], `revert ${refText}`, () =>
      call(b.backend, 'revert', refText, () => b.backend.revertVolume(ref.volume, ref.snapshot)));
  }

  // ---- clone, stream, commit, copy ----

  async clone(source: string, target: string, opts: CloneOptions = {}): Promise<Volume> {
    if (opts.mode !== undefined && opts.mode !== 'linked' && opts.mode !== 'full') {
      throw new InvalidArgument(`clone mode must be "linked" or "full", got ${String(opts.mode)}`);
    }
    const src = parseRef(source);
    const dst = parseVolumeRef(target);
    this.assertOwns(src);
    const d = this.entry(dst.backend);
    const size = opts.sizeBytes === undefined ? undefined : checkSize(opts.sizeBytes, target, d.capabilities);
    const owner = this.ownerFor(opts.owner);
    const plan = this.s.planner.plan({ op: 'clone', source, target, ...(opts.mode ? { mode: opts.mode } : {}) });
    if (!plan.supported) throw new Unsupported(`cannot clone ${source} to ${target}: ${plan.reason}`, { ref: source });
    const native = plan.steps.length === 1 && plan.steps[0]!.executor !== 'host';
    if (native) {
      const mode = plan.steps[0]!.action === 'clone.linked' ? 'linked' : 'full';
      return this.short(
        [{ key: volumeKey(src), mode: 'shared' }, { key: volumeKey(dst), mode: 'exclusive' }],
        `clone ${source} to ${target}`,
        async () => {
          const recorded = await this.targetOwner(dst, d.backend, owner, opts.owner !== undefined);
          const vol = await call(d.backend, 'clone', `${source} → ${target}`, () => d.backend.createVolume({
            name: dst.volume, owner: recorded, mode,
            source: { volume: src.volume, ...(isSnapshotRef(src) ? { snapshot: src.snapshot } : {}) },
            ...(size !== undefined ? { sizeBytes: size } : {}),
          }));
          this.s.store.setOwner(volumeKey(dst), recorded);
          return { ...vol, owner: recorded };
        },
      );
    }
    // Host data mover: create the target with the source's size, then copy the data.
    const srcVol = await this.getVolume(formatRef({ backend: src.backend, volume: src.volume }));
    if (size !== undefined && size < srcVol.sizeBytes) {
      throw new OutOfRange(`clone size ${size} is smaller than the source's ${srcVol.sizeBytes} bytes`, { ref: target });
    }
    // The copy fills a new, empty volume: an existing target is refused rather than overwritten.
    if (await call(d.backend, 'get', target, () => d.backend.getVolume(dst.volume))) {
      throw new AlreadyExists(`${target} already exists; a clone through the host needs a new volume`, { ref: target, hint: 'delete it first, or use `offload copy` to overwrite it' });
    }
    const created = await this.createVolume(target, { sizeBytes: size ?? srcVol.sizeBytes, owner });
    try {
      const info = await (await this.startCopy(source, target, true, plan, 0)).wait();
      if (info.error) throw toTypedError(info);
    } catch (e) {
      await this.deleteVolume(target).catch(() => undefined); // we created it: nothing is left behind
      throw e;
    }
    return created;
  }

  async stream(refText: string, opts: { base?: string; speed?: number } = {}): Promise<Job> {
    const ref = parseVolumeRef(refText);
    const b = this.need(ref.backend, 'chain.stream');
    this.assertOwns(ref);
    if (!b.backend.streamVolume) throw new Unsupported(`${ref.backend} reports chain.stream but has no streamVolume`, { ref: refText });
    const plan = this.s.planner.plan({ op: 'stream', ref: refText, ...(opts.base ? { base: opts.base } : {}) });
    const task = await call(b.backend, 'stream', refText, () => b.backend.streamVolume!(ref.volume, opts.base ? { base: opts.base } : {}));
    return this.startJob(task, refText, `backend:${ref.backend}`, ref.backend, [{ key: volumeKey(ref), mode: 'exclusive' }], plan, opts.speed);
  }

  async commit(refText: string, opts: { base?: string; speed?: number } = {}): Promise<Job> {
    const ref = parseVolumeRef(refText);
    const b = this.need(ref.backend, 'chain.commit');
    this.assertOwns(ref);
    if (!b.backend.commitVolume) throw new Unsupported(`${ref.backend} reports chain.commit but has no commitVolume`, { ref: refText });
    const plan = this.s.planner.plan({ op: 'commit', ref: refText, ...(opts.base ? { base: opts.base } : {}) });
    const task = await call(b.backend, 'commit', refText, () => b.backend.commitVolume!(ref.volume, opts.base ? { base: opts.base } : {}));
    return this.startJob(task, refText, `backend:${ref.backend}`, ref.backend, [{ key: volumeKey(ref), mode: 'exclusive' }], plan, opts.speed);
  }

  async copy(source: string, target: string, opts: { speed?: number } = {}): Promise<Job> {
    const plan = this.s.planner.plan({ op: 'copy', source, target });
    if (!plan.supported) throw new Unsupported(`cannot copy ${source} to ${target}: ${plan.reason}`, { ref: source });
    const src = parseVolumeRef(source);
    this.assertOwns(src);
    this.assertOwns(parseVolumeRef(target));
    const [s, t] = await Promise.all([this.getVolume(source), this.getVolume(target)]);
    if (t.sizeBytes < s.sizeBytes) {
      throw new OutOfRange(`${target} (${t.sizeBytes} bytes) is smaller than ${source} (${s.sizeBytes} bytes)`, { ref: target, hint: 'resize the target first' });
    }
    return this.startCopy(source, target, false, plan, opts.speed ?? 0);
  }

  private startCopy(source: string, target: string, targetFresh: boolean, plan: Plan, speed: number): Promise<Job> {
    const params: HostCopyParams = { source, target, targetFresh };
    const task = hostCopyTask(params, (ref, mode) => openDevice(this.s, ref, mode));
    return this.startJob(task, target, 'host', undefined, [
      { key: volumeKey(parseRef(source)), mode: 'shared' },
      { key: volumeKey(parseRef(target)), mode: 'exclusive' },
    ], plan, speed);
  }

  private async startJob(task: JobTask, ref: string, executor: string, backend: string | undefined, locks: LockRequest[], plan: Plan, speed?: number): Promise<Job> {
    this.open();
    if (speed !== undefined && (!Number.isFinite(speed) || speed < 0)) throw new InvalidArgument(`speed must be ≥ 0 bytes/s, got ${speed}`);
    return this.s.mutex.run(locks.map((l) => l.key), () =>
      this.s.jobs.start({ task, ref, executor, principal: this.principal, locks, plan, ...(backend ? { backend } : {}), ...(speed ? { speed } : {}) }));
  }

  async plan(op: Operation): Promise<Plan> {
    this.open();
    if (!op || typeof op !== 'object' || typeof (op as { op?: unknown }).op !== 'string') throw new InvalidArgument('plan needs an operation such as { op: "clone", source, target }');
    return this.s.planner.plan(op);
  }

  // ---- jobs ----

  private listJobs(filter?: { status?: string; all?: boolean }): JobInfo[] {
    this.open();
    return this.s.jobs.list().filter((j) =>
      (this.principal.role === 'admin' || j.owner === this.principal.id) && (filter?.status === undefined || j.status === filter.status));
  }

  private job(id: string): Job {
    this.open();
    const job = this.s.jobs.get(id);
    if (this.principal.role !== 'admin' && job.info().owner !== this.principal.id) {
      throw new NotFound(`job ${id} does not exist`, { ref: id });
    }
    return job;
  }

  private jobVerb(id: string, fn: (j: Job) => void): void {
    const job = this.job(id);
    const info = job.info();
    if (this.principal.role !== 'admin' && info.owner !== this.principal.id) {
      throw new PermissionDenied(`job ${id} belongs to ${info.owner}; a tenant can only act on its own jobs`, { ref: id });
    }
    fn(job);
  }

  async close(): Promise<void> {
    if (this.s.closed) return;
    this.s.closed = true;
    await this.s.jobs.close();
    await Promise.allSettled([...this.s.backends.values()].map((b) => b.backend.close?.()));
    this.s.store.close();
  }

  // ---- helpers ----

  private open(): void {
    if (this.s.closed) throw new FailedPrecondition('the broker is closed');
  }

  private entry(name: string): PlannerBackend {
    this.open();
    const b = this.s.backends.get(name);
    if (!b) throw new NotFound(`backend "${name}" is not configured`, { ref: name, hint: `configured backends: ${[...this.s.backends.keys()].join(', ') || 'none'}` });
    return b;
  }

  private need(name: string, cap: Capability): PlannerBackend {
    const b = this.entry(name);
    if (!b.capabilities.has(cap)) {
      throw new Unsupported(`${name} (${b.backend.kind}) does not support ${cap}`, { ref: name, hint: 'see `offload backends` for what each backend can do' });
    }
    return b;
  }

  private ownerFor(requested: string | undefined): string {
    if (this.principal.role === 'tenant') {
      if (requested !== undefined && requested !== this.principal.id) throw new PermissionDenied(`tenant ${this.principal.id} cannot create volumes for ${requested}`);
      return this.principal.id;
    }
    return requested ?? this.principal.id;
  }

  private mayAccess(ref: VolumeRef): boolean {
    if (this.principal.role === 'admin') return true;
    return this.s.store.getOwner(volumeKey(ref)) === this.principal.id;
  }

  private assertOwns(ref: VolumeRef): void {
    if (!this.mayAccess(ref)) throw notFoundVolume(volumeKey(ref));
  }

  private withOwner(v: Volume): Volume {
    const owner = this.s.store.getOwner(`${v.backend}/${v.name}`);
    return owner === undefined || v.owner !== undefined ? v : { ...v, owner };
  }

  /** A short operation: serialised per volume in this process, refused (Busy) while a job holds a conflicting lock. */
  private short<T>(locks: LockRequest[], description: string, fn: () => Promise<T>): Promise<T> {
    this.open();
    return this.s.mutex.run(locks.map((l) => l.key), async () => {
      const id = `op-${randomBytes(6).toString('hex')}`;
      const lease = await this.s.locks.acquire(locks, { id, principal: this.principal, description });
      let unrecord: (() => void) | undefined;
      try {
        unrecord = this.s.jobs.recordOperation(id, locks, this.principal, description);
        return await fn();
      } finally {
        unrecord?.();
        lease.release();
      }
    });
  }
}

function checkSize(size: unknown, ref: string, caps: CapabilitySet): number {
  if (typeof size !== 'number' || !Number.isFinite(size) || !Number.isInteger(size)) {
    throw new InvalidArgument(`size of ${ref} must be a whole number of bytes, got ${JSON.stringify(size) ?? String(size)}`, { ref });
  }
  if (size <= 0) throw new InvalidArgument(`size of ${ref} must be greater than 0, got ${size}`, { ref });
  const max = caps.limits('volume.create')?.maxSizeBytes ?? MAX_SAFE_SIZE;
  if (size > max) throw new InvalidArgument(`size of ${ref} (${size} bytes) exceeds the backend's maximum of ${max} bytes`, { ref });
  return size;
}

function notFoundVolume(ref: string): NotFound {
  return new NotFound(`volume ${ref} does not exist`, { ref, hint: 'list volumes with `offload volume list BACKEND`' });
}

/** Run a backend call; anything untyped it throws becomes an Internal error naming the call. */
async function call<T>(backend: StorageBackend, what: string, ref: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof OffloadError) throw e;
    throw toOffloadError(e, `${backend.name} (${backend.kind}) failed to ${what} ${ref}`);
  }
}

function toTypedError(info: JobInfo): OffloadError {
  return errorFromCode(info.error!.code, info.error!.message, { ref: info.ref });
}
