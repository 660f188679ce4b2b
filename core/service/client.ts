/**
 * The broker of a service, over its control API: a `Broker` whose every verb is a request to
 * `offload serve`, so the CLI's commands run unchanged with `--server`. Jobs are the service's
 * (ServiceJob follows them); what cannot cross the wire — a BlockDevice, a backend object — is
 * Unsupported, with a hint (an NBD export serves a volume's data).
 */
import { resolve } from 'node:path';
import type { ChangedExtents, StorageBackend } from '../backend/storage-backend.js';
import { cloneResult } from '../broker/clone-result.js';
import type {
  BackendInfo, BackupPoint, BackupsApi, Broker, CloneOptions, CloneStart, CopyOptions, ExportHandle, ExportOptions, ExportsApi, FileExportOptions, FileImportOptions,
  InstantCloneOptions, JobsApi, LiveCopyOptions, LocksApi, Reconfigured, SnapshotsApi, VolumesApi,
} from '../broker-api.js';
import type { BlockDevice } from '../backend/block-device.js';
import type { ExportInfo } from '../export/registry.js';
import type { Job, JobInfo } from '../jobs/job.js';
import type { LockInfo } from '../locks/lock-manager.js';
import type { Principal } from '../locks/principal.js';
import { CapabilitySet, type Capability, type CapabilityLimits } from '../model/capabilities.js';
import { Unsupported } from '../model/errors.js';
import { parseRef } from '../model/refs.js';
import type { Page, PageRequest, Snapshot, Volume } from '../model/types.js';
import type { Operation, Plan } from '../planner/plan.js';
import { HttpTransport, parseServerAddress } from './client-http.js';
import { ServiceJob } from './client-job.js';
import { AS_HEADER, markRemote } from './remote.js';
import { ROUTES } from './routes.js';

export interface ConnectOptions {
  /** The bearer token for a service on TCP (the CLI passes $OFFLOAD_TOKEN). */
  token?: string;
  /** For `https://`: the CA certificates (PEM) to trust instead of the system's (the CLI reads $OFFLOAD_CA). */
  ca?: string | Buffer;
  /** For `https://` to a service with --tls-client-ca: this client's certificate and key (PEM; $OFFLOAD_CERT, $OFFLOAD_KEY). */
  cert?: string | Buffer;
  key?: string | Buffer;
}

/** Connect to a service (`unix:PATH`, `http://HOST:PORT` or `https://HOST:PORT`) and learn who we are there. */
export async function connectBroker(address: string, opts: ConnectOptions = {}): Promise<Broker> {
  const tls = { ...(opts.ca !== undefined ? { ca: opts.ca } : {}), ...(opts.cert !== undefined ? { cert: opts.cert } : {}), ...(opts.key !== undefined ? { key: opts.key } : {}) };
  const http = new HttpTransport(parseServerAddress(address), opts.token ? { authorization: `Bearer ${opts.token}` } : {}, tls);
  try {
    const me = await http.call(ROUTES.whoami, {});
    return new ServiceClient(http, { id: me.id, role: me.role });
  } catch (e) {
    http.close();
    throw e;
  }
}

/** `{ backend, name }` of a ref for a path; a ref without a slash is refused here as the broker refuses it. */
function refParams(ref: string): { backend: string; name: string } {
  const slash = typeof ref === 'string' ? ref.indexOf('/') : -1;
  if (slash < 0) parseRef(ref); // throws the broker's own InvalidArgument
  return { backend: ref.slice(0, slash), name: ref.slice(slash + 1) };
}

function cannotCross(what: string): Unsupported {
  return new Unsupported(`${what} cannot cross the control API: the broker runs in the service`, {
    hint: 'serve the volume over NBD (`offload nbd REF`, broker.exports.start) and connect to that, or embed the broker',
  });
}

const absolute = (file: string): string => (typeof file === 'string' ? resolve(file) : file);

class ServiceClient implements Broker {
  readonly volumes: VolumesApi;
  readonly snapshots: SnapshotsApi;
  readonly jobs: JobsApi;
  readonly locks: LocksApi;
  readonly exports: ExportsApi;
  readonly backups: BackupsApi;

  constructor(private readonly http: HttpTransport, readonly principal: Principal) {
    markRemote(this, http.address.text);
    const job = (info: unknown): Job => new ServiceJob(http, info as JobInfo);
    const h = http;
    this.volumes = {
      create: (ref, o) => h.call(ROUTES['volumes.create'], { params: refParams(ref), body: o }) as Promise<Volume>,
      get: (ref) => h.call(ROUTES['volumes.get'], { params: refParams(ref) }) as Promise<Volume>,
      list: (backend: string, page?: PageRequest) => h.call(ROUTES['volumes.list'], { params: { backend }, query: page ?? {} }) as Promise<Page<Volume>>,
      listAll: (backend) => h.call(ROUTES['volumes.listAll'], { params: { backend } }) as Promise<Volume[]>,
      resize: (ref, sizeBytes) => h.call(ROUTES['volumes.resize'], { params: refParams(ref), body: { sizeBytes } }) as Promise<Volume>,
      delete: (ref) => h.call(ROUTES['volumes.delete'], { params: refParams(ref) }),
      changes: (ref, o) => h.call(ROUTES['volumes.changes'], { params: refParams(ref), query: o }) as Promise<ChangedExtents>,
      open: async (): Promise<BlockDevice> => { throw cannotCross('volumes.open (a block device)'); },
      exportTo: async (ref: string, file: string, o: FileExportOptions = {}) =>
        job(await h.call(ROUTES['volumes.exportTo'], { params: refParams(ref), body: { file: absolute(file), ...o } })),
      importFrom: async (file: string, ref: string, o: FileImportOptions = {}) =>
        job(await h.call(ROUTES['volumes.importFrom'], { params: refParams(ref), body: { file: absolute(file), ...o } })),
    };
    this.snapshots = {
      create: (ref) => h.call(ROUTES['snapshots.create'], { params: refParams(ref) }) as Promise<Snapshot>,
      list: (ref) => h.call(ROUTES['snapshots.list'], { params: refParams(ref) }) as Promise<Snapshot[]>,
      delete: (ref) => h.call(ROUTES['snapshots.delete'], { params: refParams(ref) }),
      revert: (ref) => h.call(ROUTES['snapshots.revert'], { params: refParams(ref) }),
    };
    const id = (i: string) => ({ params: { id: i } });
    this.jobs = {
      list: (filter) => h.call(ROUTES['jobs.list'], {
        query: { ...(filter?.status !== undefined ? { status: filter.status } : {}), ...(filter?.all !== undefined ? { all: String(filter.all) } : {}) },
      }) as Promise<JobInfo[]>,
      get: async (i) => job(await h.call(ROUTES['jobs.get'], id(i))),
      cancel: (i) => h.call(ROUTES['jobs.cancel'], id(i)),
      pause: (i) => h.call(ROUTES['jobs.pause'], id(i)),
      resume: (i) => h.call(ROUTES['jobs.resume'], id(i)),
      complete: (i) => h.call(ROUTES['jobs.complete'], id(i)),
      dismiss: (i) => h.call(ROUTES['jobs.dismiss'], id(i)),
      setSpeed: (i, bytesPerSecond) => h.call(ROUTES['jobs.setSpeed'], { ...id(i), body: { bytesPerSecond } }),
      wait: async (i) => (await this.jobs.get(i)).wait(),
      takeOver: async (i) => job(await h.call(ROUTES['jobs.takeOver'], id(i))),
    };
    this.locks = {
      maintenance: (ref, reason) => h.call(ROUTES['locks.maintenance'], { params: refParams(ref), body: { reason } }),
      release: (ref) => h.call(ROUTES['locks.release'], { params: refParams(ref) }),
      list: () => h.call(ROUTES['locks.list'], {}) as Promise<LockInfo[]>,
    };
    this.backups = {
      start: async (source, o) => job(await h.call(ROUTES['backups.start'], { body: { source, ...o } })),
      startGroup: async (pairs, o) => job(await h.call(ROUTES['backups.startGroup'], { body: { pairs, ...o } })),
      list: (target) => h.call(ROUTES['backups.list'], { params: refParams(target) }) as Promise<BackupPoint[]>,
      restore: async (point, o) => job(await h.call(ROUTES['backups.restore'], { body: { point, ...o } })),
    };
    this.exports = {
      start: (ref, o) => this.startExport(ref, o ?? {}),
      list: () => h.call(ROUTES['exports.list'], {}) as Promise<ExportInfo[]>,
      stop: (name, opts) => h.call(ROUTES['exports.stop'], { params: { name }, ...(opts?.force ? { query: { force: 'true' } } : {}) }),
      setClients: (name, clients) => h.call(ROUTES['exports.setClients'], { params: { name }, body: { clients } }) as Promise<ExportInfo>,
      reloadTls: () => h.call(ROUTES['exports.reloadTls'], {}),
    };
  }

  as(principal: Principal): Broker {
    const headers: Record<string, string> = principal.role === 'tenant' ? { [AS_HEADER]: principal.id } : {};
    return new ServiceClient(this.http.with(headers), principal);
  }

  async backends(): Promise<BackendInfo[]> {
    const list = await this.http.call(ROUTES.backends, {});
    return list.map((b) => ({
      name: b.name, kind: b.kind,
      capabilities: new CapabilitySet(Object.entries(b.capabilities).map(([c, limits]) => [c as Capability, limits as CapabilityLimits])),
    }));
  }

  backend(name: string): StorageBackend {
    throw cannotCross(`backend ${name} (a StorageBackend object)`);
  }

  async reconfigure(): Promise<Reconfigured> {
    throw new Unsupported("a service's config cannot be sent over the control API: the service reads its own config file", {
      hint: 'edit the config file on its host and send the service SIGHUP (`systemctl reload`, `kill -HUP PID`)',
    });
  }

  async clone(source: string, target: string, opts?: CloneOptions): Promise<Volume> {
    const started = await this.startClone(source, target, opts);
    if (opts?.instant && started.job) return this.volumes.get(target); // usable at once, as embedded
    return cloneResult(started, () => this.volumes.get(target));
  }

  async startClone(source: string, target: string, opts: CloneOptions = {}): Promise<CloneStart> {
    const r = await this.http.call(ROUTES.startClone, { body: { source, target, ...opts } });
    return 'job' in r && r.job ? { job: new ServiceJob(this.http, r.job as JobInfo) } : { volume: (r as { volume: Volume }).volume };
  }

  async stream(ref: string, opts: { base?: string; speed?: number } = {}): Promise<Job> {
    return new ServiceJob(this.http, await this.http.call(ROUTES.stream, { params: refParams(ref), body: opts }) as JobInfo);
  }

  async commit(ref: string, opts: { base?: string; speed?: number } = {}): Promise<Job> {
    return new ServiceJob(this.http, await this.http.call(ROUTES.commit, { params: refParams(ref), body: opts }) as JobInfo);
  }

  async copy(source: string, target: string, opts: CopyOptions = {}): Promise<Job> {
    return new ServiceJob(this.http, await this.http.call(ROUTES.copy, { body: { source, target, ...opts } }) as JobInfo);
  }

  async instantClone(pairs: { source: string; target: string }[], opts: InstantCloneOptions = {}): Promise<Job> {
    return new ServiceJob(this.http, await this.http.call(ROUTES.instantClone, { body: { pairs, ...opts } }) as JobInfo);
  }

  async liveCopy(pairs: { source: string; target: string }[], opts: LiveCopyOptions = {}): Promise<Job> {
    return new ServiceJob(this.http, await this.http.call(ROUTES.liveCopy, { body: { pairs, ...opts } }) as JobInfo);
  }

  async plan(op: Operation): Promise<Plan> {
    return await this.http.call(ROUTES.plan, { body: op }) as Plan;
  }

  async close(): Promise<void> {
    this.http.close();
  }

  /** An export the service hosts: it goes on after this client exits, until `exports.stop`. */
  private async startExport(ref: string, o: ExportOptions): Promise<ExportHandle> {
    const listen = o.listen && 'socket' in o.listen ? { socket: absolute(o.listen.socket) } : o.listen;
    const started = await this.http.call(ROUTES['exports.start'], { body: { ref, ...o, ...(listen ? { listen } : {}) } });
    let stopped: Promise<void> | undefined;
    const gone = async () => {
      while ((await this.exports.list()).some((e) => e.name === started.name)) await new Promise((r) => setTimeout(r, 1000));
    };
    return {
      ...started,
      get stopped() { return (stopped ??= gone()); },
      stop: () => this.exports.stop(started.name),
      // The service switches its exports over; a client hears of it from `nbd list`.
      onRetarget: () => undefined,
    };
  }
}
