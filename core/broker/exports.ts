/** The broker's NBD export verbs for one principal: who may export what, under which lock. */
import { randomBytes } from 'node:crypto';
import { resolve } from 'node:path';
import type { ExportHandle, ExportOptions, ExportsApi } from '../broker-api.js';
import { clientName } from '../export/cert-names.js';
import type { ListenAddress } from '../export/nbd-server.js';
import { loadNbdTls, type NbdTls, type NbdTlsConfig } from '../export/nbd-tls.js';
import type { ExportInfo } from '../export/registry.js';
import { LiveDevice } from '../live/live-device.js';
import { withChangeBitmaps } from './change-bitmaps.js';
import type { Fill } from '../live/fill.js';
import type { BlockDevice } from '../backend/block-device.js';
import type { LockRequest } from '../locks/lock-manager.js';
import { Busy, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Timeout, toOffloadError } from '../model/errors.js';
import { formatRef, isSnapshotRef, parseRef, snapshotKey, volumeKey, type Ref, type VolumeRef } from '../model/refs.js';
import type { Principal } from '../locks/principal.js';
import { Access } from './access.js';
import { answerCall } from './op-calls.js';
import { need, readerWithin, readLocks, snapshotReaders } from './operation.js';
import type { BrokerState } from './state.js';

/** How long `stop` waits for another process to stop its export. */
const STOP_WAIT_MS = 30_000;
/** Longest export name: what an NBD client may send (proto.md: names are at most 4096 bytes). */
const MAX_NAME = 4096;

/** The export verbs of one principal's broker view. */
export class Exports implements ExportsApi {
  constructor(private readonly s: BrokerState, private readonly a: Access) {}

  async start(refText: string, opts: ExportOptions = {}): Promise<ExportHandle> {
    this.s.assertOpen();
    if (opts === null || typeof opts !== 'object') throw new InvalidArgument('export options are an object: { name?, readOnly?, listen? }');
    const ref = parseRef(refText);
    const snapshot = isSnapshotRef(ref);
    if (opts.readOnly !== undefined && typeof opts.readOnly !== 'boolean') throw new InvalidArgument(`readOnly is true or false, got ${String(opts.readOnly)}`);
    if (snapshot && opts.readOnly === false) throw new InvalidArgument(`a snapshot is exported read-only: ${refText}`, { ref: refText });
    const readOnly = opts.readOnly ?? snapshot;
    const name = checkName(opts.name ?? formatRef(ref));
    const listen = checkListen(opts.listen);
    const tls = opts.tls === undefined ? undefined : exportTls(opts.tls);
    const clients = this.clientsFor(Array.isArray(opts.clients) && opts.clients.length === 0 ? [] : checkClients(opts.clients));
    if (opts.holdWrites !== undefined && (readOnly || typeof (opts.holdWrites as { then?: unknown } | null)?.then !== 'function')) {
      throw new InvalidArgument('holdWrites is a promise, for a writable export');
    }
    need(this.s, ref.backend, readOnly ? 'data.read' : 'data.write');
    await this.a.assertOwns(ref);

    const unreserve = this.s.exports.reserve(name);
    let hold: ExportHold | undefined;
    try {
      // An instant clone still filling is served through its fill, within the fill job's locks.
      const filling = snapshot ? undefined : await this.s.fills.get(formatRef(ref))?.ready.catch(() => undefined);
      hold = await holdExport(this.s, { name, ref, readOnly, principal: this.a.principal, ...(filling ? { within: filling.jobId } : {}) });
      await this.a.assertOwns(ref); // again under the lock: deleted and made again by someone else while this waited, it is not this tenant's
      const opened = filling ? await viewOrOpen(filling.fill, () => this.s.openDevice(formatRef(ref), readOnly ? 'r' : 'rw')) : await this.s.openDevice(formatRef(ref), readOnly ? 'r' : 'rw');
      // A writable export serves through a LiveDevice: what a live job of this broker watches and
      // switches (core/live/); a read-only one offers what changed since each earlier snapshot.
      const device = readOnly ? await withChangeBitmaps(this.s, ref, opened).catch(async (e: unknown) => {
        await opened.close().catch(() => undefined);
        throw e;
      }) : new LiveDevice(opened);
      if (device instanceof LiveDevice) {
        try {
          await this.forgetOrHold(device, ref as VolumeRef, name, opts.holdWrites);
        } catch (e) {
          await device.close().catch(() => undefined);
          throw e;
        }
      }
      let served: { info: ExportInfo; ended: Promise<void> };
      const held = hold;
      try {
        served = await this.s.exports.serve({ name, ref: formatRef(ref), device, readOnly, owner: this.a.principal, listen, release: () => held.release(), holder: held.id, ...(tls ? { tls } : {}), ...(clients ? { clients } : {}) });
      } catch (e) {
        await device.close().catch(() => undefined);
        throw e;
      }
      hold = undefined; // the registry releases from now on
      const { info } = served;
      await held.list(info.uri, info.startedAt);
      this.s.logger.info(`nbd export ${name} of ${info.ref} at ${info.uri}${readOnly ? ' (read-only)' : ''}`);
      return {
        name, ref: info.ref, uri: info.uri, readOnly, ...(clients ? { clients } : {}), stopped: served.ended, stop: () => this.s.exports.stop(name).catch(ignoreGone),
        onRetarget: (fn) => this.s.exports.onRetarget(name, fn),
      };
    } finally {
      await hold?.release();
      unreserve();
    }
  }

  /**
   * The clients an export admits: those asked for, within the principal's binding (a tenant bound
   * to its hosts cannot open its disks to others); the binding itself when none are asked for.
   */
  private clientsFor(asked: string[] | undefined): string[] | undefined {
    const bound = this.a.principal.nbdClients;
    if (!bound) return asked;
    assertWithin(this.a.principal, bound, asked ?? []);
    return asked ?? [...bound];
  }

  /**
   * Earlier live copies of a volume exported writable here cannot account for its writes: their
   * write-intent records (the way on of a copy whose service died) are taken away before it
   * serves — or, with `hold` (a restarting service that resumes such a copy), the writes wait
   * until the resumed copy guards them, or until `hold` settles without it (the records are then
   * taken away first; failing that, the export stops rather than let writes land unaccounted for).
   */
  private async forgetOrHold(device: LiveDevice, ref: VolumeRef, name: string, hold: Promise<unknown> | undefined): Promise<void> {
    const key = volumeKey(ref);
    if (!hold) {
      await this.s.dropCrashIntents(key);
      return;
    }
    const s = this.s;
    device.holdWrites((async () => {
      await hold.catch(() => undefined);
      if (!device.writesHeld) return;
      try {
        await s.dropCrashIntents(key);
      } catch (e) {
        s.logger.error(`export ${name} of ${key}: the write-intent records of its interrupted live copies cannot be taken away (${toOffloadError(e).message}); it stops rather than let writes land they do not account for`);
        void s.exports.stop(name).catch(() => undefined);
        throw e;
      }
    })());
  }

  async setClients(name: string, clients: string[]): Promise<ExportInfo> {
    this.s.assertOpen();
    const asked = Array.isArray(clients) && clients.length === 0 ? [] : checkClients(clients ?? null);
    const local = this.s.exports.get(name);
    if (!local || !(this.a.isAdmin || local.owner === this.a.principal.id)) {
      const remote = (await this.s.jobs.foreignExports()).find((e) => e.name === name && (this.a.isAdmin || e.owner === this.a.principal.id));
      if (remote) throw new FailedPrecondition(`export ${name} is served by another process (pid ${remote.runnerPid}): its clients are changed there`, { ref: name });
      throw new NotFound(`no export named ${name}`, { ref: name, hint: 'list exports with `offload nbd list`' });
    }
    const owner = this.s.exports.device(name)?.owner;
    const admitted = this.clientsFor(asked)!;
    if (owner?.nbdClients) assertWithin(owner, owner.nbdClients, admitted);
    const { ownerRole: _, ...info } = this.s.exports.setClients(name, admitted);
    return info;
  }

  async reloadTls(): Promise<{ reloaded: number; failed: string[] }> {
    this.s.assertOpen();
    if (!this.a.isAdmin) throw new PermissionDenied('reloading the NBD TLS credentials is for administrators');
    return this.s.exports.reloadTls();
  }

  /** This broker's exports, and those other live processes sharing its state serve (`offload nbd` elsewhere). */
  async list(): Promise<ExportInfo[]> {
    this.s.assertOpen();
    const foreign = await this.s.jobs.foreignExports();
    const here = this.s.exports.list().map(({ ownerRole: _, ...e }) => e);
    const elsewhere = foreign.map((e) => ({
      name: e.name, ref: e.ref, uri: e.uri, readOnly: e.readOnly, owner: e.owner, startedAt: e.startedAt, pid: e.runnerPid,
    }));
    return [...here, ...elsewhere].filter((e) => this.a.isAdmin || e.owner === this.a.principal.id);
  }

  /**
   * Stop an export: an administrator any, a tenant its own (another's does not exist for it). One
   * that another process serves is asked to stop; this waits until it has (or its process is gone).
   */
  async stop(name: string, opts: { force?: boolean } = {}): Promise<void> {
    this.s.assertOpen();
    const mine = (owner: string) => this.a.isAdmin || owner === this.a.principal.id;
    const local = this.s.exports.get(name);
    if (local && mine(local.owner)) {
      if (local.liveJob !== undefined) {
        // Hot-unplug under a live copy: refused, or with force the job is cancelled first (its source stays current).
        const job = await this.s.jobs.get(local.liveJob);
        if (!opts.force) {
          throw new Busy(`export ${name} serves ${local.ref} under live job ${local.liveJob} (${job.info().type} to ${job.info().ref})`, {
            ref: name, hint: `complete or cancel job ${local.liveJob} first, or stop with --force, which cancels it`, data: { holder: local.liveJob },
          });
        }
        if (!this.a.isAdmin && job.info().owner !== this.a.principal.id) {
          throw new PermissionDenied(`export ${name} is under live job ${local.liveJob} of ${job.info().owner}, which only its owner or an administrator may cancel`, { ref: name });
        }
      }
      return this.s.exports.stop(name);
    }
    const remote = (await this.s.jobs.foreignExports()).filter((e) => e.name === name && mine(e.owner));
    if (remote.length === 0) throw new NotFound(`no export named ${name}`, { ref: name, hint: 'list exports with `offload nbd list`' });
    for (const e of remote) await this.s.jobs.requestExportStop(e.id);
    const deadline = Date.now() + STOP_WAIT_MS;
    while ((await this.s.jobs.foreignExports()).some((e) => remote.some((r) => r.id === e.id))) {
      if (Date.now() > deadline) throw new Timeout(`export ${name} (pid ${remote[0]!.runnerPid}) did not stop within ${STOP_WAIT_MS / 1000} s`, { ref: name });
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

/** What an export holds while it serves a volume: its locks, seen by the other brokers, and its export record. */
export interface ExportHold {
  /** The id its locks are held under. */
  id: string;
  /** Its record (what `nbd list` of other processes shows), once it serves. */
  list(uri: string, startedAt: string): Promise<void>;
  release(): Promise<void>;
}

/**
 * Take an export's locks (a writable export exclusive, a read-only one shared) and publish them.
 * `within`: the live job the export moves under at a switch-over, which holds the volume already.
 */
export async function holdExport(s: BrokerState, e: { name: string; ref: Ref; readOnly: boolean; principal: Principal; within?: string }): Promise<ExportHold> {
  const { ref, name, readOnly, principal } = e;
  const locks: LockRequest[] = isSnapshotRef(ref) ? readLocks(ref) : [{ key: volumeKey(ref), mode: readOnly ? 'shared' : 'exclusive' }];
  const id = `export:${name}#${randomBytes(4).toString('hex')}`;
  const description = `nbd export ${name} of ${formatRef(ref)} (${readOnly ? 'read-only' : 'read-write'})`;
  // An administrator's conflicting request stops a tenant's export (here, or from another process).
  const preempt = () => void s.exports.stop(name).catch(() => undefined);
  const alongside = await exportsAlongside(s, ref, readOnly, locks);
  // Alongside is not within another's work going on: a backend being taken out of the config admits no new export.
  if (alongside.length > 0) s.locks.assertAdmitted(locks);
  const within = [...(e.within !== undefined ? [e.within] : []), ...alongside];
  const holder = { id, principal, description, preempt, ...(within.length > 0 ? { within } : {}) };
  // A writable export answers what other processes ask of its volume (op-calls.ts: a snapshot, within its lock; a live copy).
  const handlers = s.callHandlers;
  const onCall = readOnly || isSnapshotRef(ref) || !handlers ? undefined : (call: string) => answerCall(formatRef(ref), call, handlers);
  const lease = await s.mutex.run(locks.map((l) => l.key), () => s.locks.acquirePublished(locks, holder,
    () => s.jobs.publishOperation(id, locks, principal, description, preempt, onCall)));
  let unlist: (() => Promise<void>) | undefined;
  return {
    id,
    list: async (uri, startedAt) => {
      unlist = await s.jobs.recordExport({ id, name, ref: formatRef(ref), uri, readOnly, owner: principal.id, role: principal.role, startedAt });
    },
    release: async () => {
      await unlist?.();
      await lease.release();
    },
  };
}

/**
 * The holders, of this process and of others, that an export of `ref` works alongside: a snapshot
 * is read while its volume is written (a backup application reading a point of a running VM's
 * disk), so an export of a snapshot and what the volume is in use through (its writable export, a
 * live copy of it) do not keep each other out, whichever starts first; nor a writable export and
 * a job reading a snapshot (a clone or copy of it). The volume's other keepers stay: it cannot be
 * deleted, reverted or resized while one of its snapshots is read, nor written by a second writer.
 */
async function exportsAlongside(s: BrokerState, ref: Ref, readOnly: boolean, locks: LockRequest[]): Promise<string[]> {
  if (isSnapshotRef(ref)) return readerWithin(s, locks);
  return readOnly ? [] : snapshotReaders(s, [volumeKey(ref)], locks); // a shared lock keeps no reader of a snapshot out
}

/** A principal bound to its NBD clients (`bound`) may name only those: PermissionDenied naming the others. */
export function assertWithin(p: Principal, bound: readonly string[], clients: readonly string[]): void {
  const outside = clients.filter((c) => !bound.includes(c));
  if (outside.length > 0) {
    throw new PermissionDenied(`${p.id}'s exports admit only its NBD clients (${bound.join(', ')}), not ${outside.join(', ')}`, {
      hint: 'name clients among those, or leave them out',
    });
  }
}

/** ExportOptions.clients, checked: one name or more. */
function checkClients(value: unknown): string[] | undefined {
  if (value === undefined) return undefined;
  if (!Array.isArray(value) || value.length === 0 || !value.every((n) => typeof n === 'string' && n.length > 0 && n.length <= 255)) {
    throw new InvalidArgument(`clients is a list of one or more TLS client names (certificate common names, DNS:…/URI:… subject alternative names, PSK identities), got ${JSON.stringify(value)}`);
  }
  return [...new Set((value as string[]).map(clientName))];
}

/** An export's own TLS credentials (ExportOptions.tls), checked and read now: a bad file fails the start. */
function exportTls(value: unknown): { creds: () => NbdTls; id: string } {
  const v = value as Record<string, unknown> | null;
  const str = (x: unknown) => typeof x === 'string' && x.length > 0;
  const x509 = v !== null && typeof v === 'object' && str(v.x509) && Object.keys(v).every((k) => ['x509', 'verifyPeer', 'allow'].includes(k))
    && (v.verifyPeer === undefined || typeof v.verifyPeer === 'boolean') && (v.allow === undefined || (Array.isArray(v.allow) && v.allow.length > 0 && v.allow.every(str)));
  const psk = v !== null && typeof v === 'object' && str(v.psk) && Object.keys(v).length === 1;
  if (!x509 && !psk) throw new InvalidArgument('tls is { x509: FOLDER, verifyPeer?, allow?: [NAME…] } or { psk: FILE }, as the config\'s nbd.tls');
  const config: NbdTlsConfig = psk ? { psk: resolve(v!.psk as string) } : { ...(v as { x509: string }), x509: resolve(v!.x509 as string) };
  const creds = loadNbdTls(config);
  return { creds: () => creds, id: JSON.stringify(config) };
}

/** The fill's view of its target, or (the fill ended just now) the target itself. */
async function viewOrOpen(fill: Fill, open: () => Promise<BlockDevice>): Promise<BlockDevice> {
  try {
    return fill.view();
  } catch {
    return open();
  }
}

/** Stopping an export that another caller stopped first is fine. */
function ignoreGone(e: unknown): void {
  if (!(e instanceof NotFound)) throw e;
}

function checkName(name: unknown): string {
  if (typeof name !== 'string' || name.length === 0 || Buffer.byteLength(name) > MAX_NAME || /[\u0000-\u001f\u007f]/.test(name)) {
    throw new InvalidArgument(`an export name is 1–${MAX_NAME} bytes without control characters, got ${JSON.stringify(name)}`);
  }
  return name;
}

function checkListen(l: unknown): ListenAddress {
  if (l === undefined) return { host: '127.0.0.1', port: 10809 };
  if (l === null || typeof l !== 'object') throw new InvalidArgument('listen is { host?, port? } or { socket }');
  const a = l as { host?: unknown; port?: unknown; socket?: unknown };
  if (a.socket !== undefined) {
    if (typeof a.socket !== 'string' || a.socket.length === 0 || a.host !== undefined || a.port !== undefined) {
      throw new InvalidArgument('listen { socket } takes a socket path and no host or port');
    }
    return { socket: resolve(a.socket) };
  }
  if (a.host !== undefined && (typeof a.host !== 'string' || a.host.length === 0)) throw new InvalidArgument(`listen host must be an address, got ${String(a.host)}`);
  if (a.port !== undefined && (typeof a.port !== 'number' || !Number.isInteger(a.port) || a.port < 0 || a.port > 65535)) {
    throw new InvalidArgument(`listen port is 0–65535 (0: a free one), got ${String(a.port)}`);
  }
  return { host: (a.host as string | undefined) ?? '127.0.0.1', port: (a.port as number | undefined) ?? 10809 };
}
