/**
 * The broker facade: createBroker builds the shared state (plugins, config, backends, job store,
 * planner, recovered jobs); each principal gets a BrokerView over it, assembled from the verbs in
 * broker/ (volumes and snapshots, long operations, jobs and locks) and the access rules.
 */
import { accessSync, constants, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { ContainerModule } from 'inversify';
import type { Logger } from './backend/plugin.js';
import { loadPlugins, type LoadedPlugins } from './backend/plugin-container.js';
import type { StorageBackend } from './backend/storage-backend.js';
import { Access } from './broker/access.js';
import { instantCloneTask } from './broker/instant-clones.js';
import { snapshotsAtOneInstant } from './broker/group-snapshots.js';
import { reconfigure, startBackend } from './broker/reconfigure.js';
import type { FillParams } from './live/fill-task.js';
import { DataJobs } from './broker/data-jobs.js';
import { Exports } from './broker/exports.js';
import { Jobs, Locks } from './broker/jobs-locks.js';
import { BrokerState } from './broker/state.js';
import { Snapshots, Volumes } from './broker/volumes.js';
import { Backups } from './broker/backups.js';
import type { BackendInfo, BackupsApi, Broker, Reconfigured, CloneOptions, CloneStart, CopyOptions, ExportsApi, InstantCloneOptions, LiveCopyOptions, JobsApi, LocksApi, SnapshotsApi, VolumesApi } from './broker-api.js';
import { toBrokerConfig, type BrokerConfig, type RawConfig } from './config/config.js';
import { ConfigError } from './config/config-error.js';
import { secrets } from './config/secrets.js';
import { JobManager, type JobEventHook, type TaskResolver } from './jobs/job-manager.js';
import { ExportRegistry } from './export/registry.js';
import { ConfiguredNbdTls } from './export/nbd-tls.js';
import { clientName } from './export/cert-names.js';
import type { Job } from './jobs/job.js';
import { ADMIN, tenant, type Principal } from './locks/principal.js';
import { createLogger } from './logger.js';
import { InvalidArgument, PermissionDenied, toOffloadError } from './model/errors.js';
import type { Volume } from './model/types.js';
import type { Operation, Plan } from './planner/plan.js';
import { Planner, type PlannerBackend } from './planner/planner.js';
import { FileFormats } from './broker/file-formats.js';
import { SqliteStateStore } from './state/sqlite/sqlite-store.js';
import type { StateStore } from './state/state-store.js';

/** How long a long-running broker keeps concluded jobs by default (the config's jobRetentionDays). */
const DEFAULT_JOB_RETENTION_DAYS = 7;

export interface CreateBrokerOptions {
  /** Plugin modules (e.g. `builtinPlugins` from plugins/index.ts), or plugins already loaded (the CLI loads them once). */
  plugins: readonly ContainerModule[] | LoadedPlugins;
  /** Who acts (default: the administrator). */
  principal?: Principal;
  logger?: Logger;
  /** Environment for `${VAR}` references (default process.env). */
  env?: NodeJS.ProcessEnv;
  /**
   * Take over the orphaned jobs at start — those whose runner stopped (default true for a
   * program that embeds the broker; the CLI passes false, so that listing or showing never adopts
   * a job: `offload jobs resume ID` takes one over). A job somebody runs is never taken.
   */
  recoverJobs?: boolean;
  /**
   * Keep taking over orphaned jobs while the broker is open (a service's broker): every `everyMs`
   * (default a third of the lease), up to `maxJobs` running here (default 4). Such a broker also
   * dismisses concluded jobs older than the config's jobRetentionDays (at start, then hourly).
   */
  adoptOrphans?: { everyMs?: number; maxJobs?: number };
  /** Told of job takeovers this broker wins and jobs it loses to fencing (a service counts them). */
  onJobEvent?: JobEventHook;
  /** How often a running job saves its checkpoint at most (default 1000 ms; tests of resumes use 0). */
  checkpointEveryMs?: number;
  /**
   * A service that restores its exports when it starts again (`offload serve`): close() suspends
   * its live copies at a snapshot of each source instead of cancelling them, for the next start to
   * resume (`liveCopy([], { resume: ID })`) rather than copy everything again.
   */
  suspendLiveCopies?: boolean;
}

/**
 * Build a broker: load the plugins, validate the config (a path, a raw object or an already
 * validated config), create one backend per entry, open the job store and recover its jobs.
 */
export async function createBroker(config: string | RawConfig | BrokerConfig, opts: CreateBrokerOptions): Promise<Broker> {
  const logger = opts.logger ?? createLogger();
  const { factories, formats } = 'factories' in opts.plugins ? opts.plugins : await loadPlugins(opts.plugins);
  const validated = toBrokerConfig(config, factories, opts.env);

  // NBD's TLS credentials: read when first needed, and before anything is opened by a broker
  // that recovers jobs (`offload serve`, a program): bad ones are a ConfigError at its start, as
  // for qemu-nbd. A CLI command reads them at its first export only (`offload volume list` needs
  // no server key).
  const nbdTls = validated.nbd?.tls && new ConfiguredNbdTls(validated.nbd.tls);
  if (nbdTls && opts.recoverJobs !== false) nbdTls.get();
  prepareStateDir(validated.state);
  const byKind = new Map(factories.map((f) => [f.kind, f]));
  const backends = new Map<string, PlannerBackend>();
  const store = await openStateStore(validated);
  try {
    for (const entry of validated.backends) {
      backends.set(entry.name, await startBackend(byKind.get(entry.kind)!, entry, { stateDir: validated.state, baseDir: validated.baseDir, logger }));
    }
  } catch (e) {
    await Promise.allSettled([...backends.values()].map((b) => b.backend.close?.()));
    await store.close();
    throw e;
  }
  const state = new BrokerState(validated, backends, store, logger, new Planner(backends), new FileFormats(formats),
    new ExportRegistry(nbdTls?.get, () => nbdTls?.current), byKind, nbdTls);
  // A fill job (an instant clone) is rebuilt here, where both the state and the broker's verbs are known.
  const resolve: TaskResolver = (rec, stopped) => rec.executor === 'host' && rec.type === 'fill' ? Promise.resolve(instantCloneTask(state, rec.params as unknown as FillParams)) : state.resolveTask(rec, stopped);
  state.jobs = new JobManager(store, state.locks, resolve, logger, {
    ...(opts.checkpointEveryMs !== undefined ? { checkpointEveryMs: opts.checkpointEveryMs } : {}),
    ...(opts.onJobEvent ? { onEvent: opts.onJobEvent } : {}),
    placement: (rec) => state.placement(rec),
    beforeDismiss: (rec) => state.beforeDismiss(rec),
    ...(validated.leaseSeconds !== undefined ? { leaseMs: validated.leaseSeconds * 1000 } : {}),
    ...(validated.lockWaitSeconds !== undefined ? { lineWaitMs: validated.lockWaitSeconds * 1000 } : {}),
    ...(validated.hostId !== undefined ? { hostId: validated.hostId } : {}),
    runnerLockDir: join(validated.state, 'runners'),
  });
  if (opts.suspendLiveCopies) state.suspendLiveCopies = true;
  // What other processes ask of this broker's exports (op-calls.ts), made as the asking principal's view of it.
  state.callHandlers = {
    snapshot: (p, c) => new BrokerView(state, p).snapshots.create(c.ref),
    'snapshot.delete': (p, c) => new BrokerView(state, p).snapshots.delete(c.ref),
    // Taken here or refused: never asked of yet another process.
    'snapshot.group': (p, c) => snapshotsAtOneInstant(state, new Access(state, p), c.refs ?? [c.ref], -1),
    'copy.live': async (p, c) => {
      const o = c.options ?? {};
      const options = {
        ...(o.mode !== undefined ? { mode: o.mode as LiveCopyOptions['mode'] } : {}), ...(o.speed !== undefined ? { speed: o.speed } : {}),
        ...(o.resume !== undefined ? { resume: o.resume } : {}),
      };
      const view = new BrokerView(state, p);
      // From a snapshot its target holds (`copy --live SRC DST --since S`): one pair.
      const one = c.pairs?.length === 1 ? c.pairs[0]! : undefined;
      if (o.since !== undefined && one) return { job: (await view.copy(one.source, one.target, { ...options, live: true, since: o.since })).id };
      return { job: (await view.liveCopy(c.pairs ?? [], options)).id };
    },
  };
  const broker = new BrokerView(state, opts.principal ?? ADMIN);
  if (opts.adoptOrphans) {
    state.jobs.adoptOrphans(opts.adoptOrphans);
    const days = validated.jobRetentionDays ?? DEFAULT_JOB_RETENTION_DAYS;
    state.jobs.sweepConcluded({ ...(days > 0 ? { retentionMs: days * 86_400_000 } : {}), keep: (rec) => state.resumable(rec) });
  }
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

/** SQLite in the state directory, or the PostgreSQL database the config names. */
async function openStateStore(c: BrokerConfig): Promise<StateStore> {
  if (c.database === undefined) {
    try {
      return new SqliteStateStore(join(c.state, 'jobs.sqlite'));
    } catch (e) {
      throw toOffloadError(e, 'opening the state store');
    }
  }
  const { openPostgresStore } = await import('./state/postgres/postgres-store.js');
  try {
    return await openPostgresStore(c.database);
  } catch (e) {
    const err = toOffloadError(e);
    throw new ConfigError(secrets.redact(`state: cannot use the PostgreSQL database: ${err.message}`), err.hint ?? 'check the URL, that the server runs, and that the user may connect and create tables');
  }
}

function prepareStateDir(dir: string): void {
  try {
    mkdirSync(dir, { recursive: true });
    accessSync(dir, constants.W_OK);
  } catch (e) {
    throw new ConfigError(`state: cannot use ${dir} as the broker's state directory: ${(e as Error).message}`, 'set `state:` in the config to a writable folder');
  }
}

/** One principal's view of a broker. */
class BrokerView implements Broker {
  readonly volumes: VolumesApi;
  readonly snapshots: SnapshotsApi;
  readonly jobs: JobsApi;
  readonly locks: LocksApi;
  readonly exports: ExportsApi;
  readonly backups: BackupsApi;
  private readonly data: DataJobs;

  constructor(private readonly s: BrokerState, readonly principal: Principal) {
    const access = new Access(s, principal);
    const volumes = new Volumes(s, access);
    const snapshots = new Snapshots(s, access);
    this.volumes = volumes;
    this.snapshots = snapshots;
    this.jobs = new Jobs(s, access);
    this.locks = new Locks(s, access);
    this.exports = new Exports(s, access);
    this.data = new DataJobs(s, access, volumes);
    this.backups = new Backups(s, access, {
      volumes, snapshots, copy: (src, dst, o) => this.data.copy(src, dst, o), startClone: (src, dst, o) => this.data.startClone(src, dst, o),
    });
  }

  as(principal: Principal): Broker {
    if (principal?.role !== 'admin' && principal?.role !== 'tenant') throw new InvalidArgument('a principal is { id, role: "admin" | "tenant", nbdClients?: [NAME…] }');
    const clients = principal.nbdClients;
    if (clients !== undefined && (!Array.isArray(clients) || clients.length === 0 || !clients.every((c) => typeof c === 'string' && c.length > 0))) {
      throw new InvalidArgument(`a principal's nbdClients are one or more TLS client names, got ${JSON.stringify(clients)}`);
    }
    const p = principal.role === 'tenant' ? tenant(principal.id) : principal;
    return new BrokerView(this.s, clients !== undefined ? { ...p, nbdClients: Object.freeze(clients.map(clientName)) } : p);
  }

  async backends(): Promise<BackendInfo[]> {
    this.s.assertOpen();
    return [...this.s.backends.entries()].map(([name, b]) => ({ name, kind: b.backend.kind, capabilities: b.capabilities }));
  }

  backend(name: string): StorageBackend {
    return this.s.entry(name).backend;
  }

  async reconfigure(config: string | RawConfig | BrokerConfig, opts: { env?: NodeJS.ProcessEnv } = {}): Promise<Reconfigured> {
    this.s.assertOpen();
    if (this.principal.role !== 'admin') throw new PermissionDenied("changing the broker's config is for administrators");
    return reconfigure(this.s, toBrokerConfig(config, [...this.s.factories.values()], opts.env));
  }

  clone(source: string, target: string, opts?: CloneOptions): Promise<Volume> { return this.data.clone(source, target, opts); }
  startClone(source: string, target: string, opts?: CloneOptions): Promise<CloneStart> { return this.data.startClone(source, target, opts); }
  stream(ref: string, opts?: { base?: string; speed?: number }): Promise<Job> { return this.data.stream(ref, opts); }
  commit(ref: string, opts?: { base?: string; speed?: number }): Promise<Job> { return this.data.commit(ref, opts); }
  copy(source: string, target: string, opts?: CopyOptions): Promise<Job> { return this.data.copy(source, target, opts); }
  liveCopy(pairs: { source: string; target: string }[], opts?: LiveCopyOptions): Promise<Job> { return this.data.liveCopy(pairs, opts); }
  instantClone(pairs: { source: string; target: string }[], opts?: InstantCloneOptions): Promise<Job> { return this.data.instantClone(pairs, opts); }

  async plan(op: Operation): Promise<Plan> {
    this.s.assertOpen();
    if (!op || typeof op !== 'object' || typeof (op as { op?: unknown }).op !== 'string') throw new InvalidArgument('plan needs an operation such as { op: "clone", source, target }');
    return this.s.planner.plan(op);
  }

  async close(): Promise<void> {
    if (this.s.closed) return;
    this.s.closed = true;
    await this.s.exports.closeAll(); // clients see a clean disconnect; the volumes are flushed and closed
    await this.s.jobs.close();
    // A reconfiguration under way (making a backend) ends first: it finds the broker closed and closes what it made.
    await this.s.mutex.run(['reconfigure'], async () => undefined);
    await Promise.allSettled([...this.s.backends.values()].map((b) => b.backend.close?.()));
    await this.s.closeRetired();
    await this.s.store.close();
  }
}
