import type { BlockDevice } from './backend/block-device.js';
import type { ChangedExtents, StorageBackend } from './backend/storage-backend.js';
import type { ExportInfo } from './export/registry.js';
import type { ListenAddress } from './export/nbd-server.js';
import type { NbdTlsConfig } from './export/nbd-tls.js';
import type { Job, JobInfo } from './jobs/job.js';
import type { Principal } from './locks/principal.js';
import type { LockInfo } from './locks/lock-manager.js';
import type { CapabilitySet } from './model/capabilities.js';
import type { Page, PageRequest, Snapshot, Volume } from './model/types.js';
import type { Operation, Plan } from './planner/plan.js';
import type { RawConfig } from './config/config.js';

export interface BackendInfo {
  name: string;
  kind: string;
  capabilities: CapabilitySet;
}

export interface VolumesApi {
  create(ref: string, opts: { sizeBytes: number; owner?: string }): Promise<Volume>;
  get(ref: string): Promise<Volume>;
  /** Volumes of one backend, a page at a time. */
  list(backend: string, page?: PageRequest): Promise<Page<Volume>>;
  /** Every volume of one backend (follows pages). */
  listAll(backend: string): Promise<Volume[]>;
  resize(ref: string, sizeBytes: number): Promise<Volume>;
  delete(ref: string): Promise<void>;
  /**
   * `data.dirty`: the ranges of `ref` (a volume now, or one of its snapshots) that changed since
   * its snapshot `since` (a name, or `backend/volume@name`), as the backend tracks them.
   * Unsupported when the backend cannot tell.
   */
  changes(ref: string, opts: { since: string; offset?: number; length?: number }): Promise<ChangedExtents>;
  /**
   * Open the data path of a volume (needs `data.read`, and `data.write` for `rw`). No lock is
   * taken: the caller answers for what else writes it. `rw` drops a crashed live copy's
   * write-intent record of it (the copy cannot be resumed over writes it never saw).
   */
  open(ref: string, mode?: 'r' | 'rw'): Promise<BlockDevice>;
  /** Copy a volume's (or a snapshot's) data into a new local image file, sparse, as a host job. */
  exportTo(ref: string, file: string, opts?: FileExportOptions): Promise<Job>;
  /** Copy a local image file's guest content into a volume, as a host job. */
  importFrom(file: string, ref: string, opts?: FileImportOptions): Promise<Job>;
}

export interface SnapshotsApi {
  /** `ref` is `backend/volume@snapshot`. */
  create(ref: string): Promise<Snapshot>;
  list(volumeRef: string): Promise<Snapshot[]>;
  delete(ref: string): Promise<void>;
  revert(ref: string): Promise<void>;
}

export interface JobsApi {
  /** Jobs this principal may see, oldest first; `status: 'orphaned'` lists the jobs nobody runs. */
  list(filter?: { status?: string; all?: boolean }): Promise<JobInfo[]>;
  get(id: string): Promise<Job>;
  cancel(id: string): Promise<void>;
  pause(id: string): Promise<void>;
  resume(id: string): Promise<void>;
  complete(id: string): Promise<void>;
  dismiss(id: string): Promise<void>;
  setSpeed(id: string, bytesPerSecond: number): Promise<void>;
  wait(id: string): Promise<JobInfo>;
  /**
   * Take over an orphaned job (JobInfo.orphaned: its runner stopped) and run it in this process
   * from its checkpoint, or conclude it as interrupted when it cannot be resumed. Busy while
   * another runner holds its lease.
   */
  takeOver(id: string): Promise<Job>;
}

export interface LocksApi {
  /** Administrators only: place a maintenance lock on a volume. */
  maintenance(ref: string, reason: string): Promise<void>;
  /** Administrators only: remove a maintenance lock. */
  release(ref: string): Promise<void>;
  list(): Promise<LockInfo[]>;
}

export interface ExportOptions {
  /** The export's name in the URI (default: the ref, `backend/volume`). Unique among this broker's exports. */
  name?: string;
  /** Serve read-only (a shared lock: others may read the volume too). Snapshots are always read-only. */
  readOnly?: boolean;
  /** Where to listen (default 127.0.0.1:10809; `port: 0` picks a free port; `{ socket }` a unix socket). */
  listen?: ListenAddress;
  /**
   * Require TLS with these credentials on this export's server (as qemu-nbd `--tls-creds`), in
   * place of the config's `nbd.tls`; relative paths are the working folder's. Exports sharing an
   * address must agree on it.
   */
  tls?: NbdTlsConfig;
  /**
   * Only these TLS clients may open it — a certificate's common name or subject alternative name (`DNS:…`, `URI:…`: certificateNames), or the identity a PSK
   * client gives — with the server's TLS (the config's `nbd.tls` or `tls` here) telling them
   * apart; to any other client it does not exist (no such export, not listed). Without it, every
   * client the server's TLS lets in; `[]`: none, until `setClients` names some.
   */
  clients?: string[];
  /**
   * A writable export: hold its clients' writes (reads go on) until a live copy resumed after a
   * crash guards them (its write-intent record takes each in before it lands), or this settles —
   * what a restarting service does for the sources of such copies. Without it, starting a
   * writable export takes away the write-intent records of earlier live copies of the volume:
   * they cannot account for its writes. Embedded brokers only.
   */
  holdWrites?: Promise<unknown>;
}

/** A running export: its URI for clients, and how to end it. */
export interface ExportHandle {
  readonly name: string;
  readonly ref: string;
  readonly uri: string;
  readonly readOnly: boolean;
  /** The only TLS clients it admits (ExportOptions.clients, or its principal's binding). */
  readonly clients?: readonly string[];
  /** Resolves once the export has stopped: by stop(), an administrator's preemption, or the broker closing. */
  readonly stopped: Promise<void>;
  /** Disconnect its clients (after their requests in flight), flush and close the volume, release its lock. */
  stop(): Promise<void>;
  /** Told the volume it serves now when a live copy switches it over (its `ref` stays the one it started with). */
  onRetarget(listener: (ref: string) => void): void;
}

/**
 * Volumes served over NBD to real clients (QEMU, qemu-img, nbdcopy, the kernel). A writable export
 * holds an exclusive lock on its volume, a read-only one a shared lock: deleting, resizing,
 * reverting or streaming an exported volume is Busy naming the export. An administrator can stop
 * any export (and preempts a tenant's); a tenant exports and sees only its own.
 */
export interface ExportsApi {
  start(ref: string, opts?: ExportOptions): Promise<ExportHandle>;
  list(): Promise<ExportInfo[]>;
  /**
   * Stop an export. One whose volume is under a live copy (`liveJob` in its info) is refused
   * (Busy naming the job) unless `force`, which cancels the job first: its source stays current.
   */
  stop(name: string, opts?: { force?: boolean }): Promise<void>;
  /**
   * Read this broker's NBD TLS credentials again (the files of the config's `nbd.tls` and of each
   * export's own; the settings themselves are read at start only): a renewed certificate, a new
   * ca-crl.pem, PSK keys added or taken away count for every handshake from now on; clients
   * connected already stay. Administrators only. How many were read, and why each of the others
   * could not be (those keep what they had).
   */
  reloadTls(): Promise<{ reloaded: number; failed: string[] }>;
  /**
   * Change which TLS clients an export of this broker admits (ExportOptions.clients) from now on:
   * a VM moving to another host, a host shut out. Clients connected already stay; an empty list
   * admits no new one. An administrator's any export, a tenant's its own (within its `nbdClients`).
   * Its info as it is now; an export another process serves is FailedPrecondition (change it there).
   */
  setClients(name: string, clients: string[]): Promise<ExportInfo>;
}

export interface CloneOptions {
  mode?: 'linked' | 'full';
  sizeBytes?: number;
  owner?: string;
  /** `host`: copy through the host even where the backend could clone natively (to compare, or to distrust an appliance). */
  prefer?: 'native' | 'host';
  /** A clone through the host: compare checksums of source and target after the copy. */
  verify?: boolean;
  /** A clone through the host: rate limit in bytes/s. */
  speed?: number;
  /**
   * Usable at once, across any backends: the new volume is created and can be exported right
   * away (reads of what is not copied yet come from the source, writes go to the clone) while a
   * job (type `fill`) copies the rest; its record of what is filled survives a restart. The source
   * is locked (shared) until the fill ends. Cancelling the job abandons the clone (its exports
   * stop and it is deleted). An export of the clone must be started in the broker that runs the job.
   */
  instant?: boolean;
  /** An instant clone: keep what clients read from the source (QEMU's copy-on-read), so it is read from the source once. */
  copyOnRead?: boolean;
}

export interface CopyOptions {
  /** Rate limit in bytes/s (0 = unlimited). */
  speed?: number;
  /** Compare checksums of source and target after the copy. */
  verify?: boolean;
  /** Accepted for symmetry with clone: a copy between volumes always runs through the host. */
  prefer?: 'native' | 'host';
  /**
   * Copy a volume in use: the source must be exported read-write by this broker (its writes are
   * seen there). The target is created (the source's size) if it does not exist. The job reaches
   * `ready` once the target is in sync and keeps it in sync; `complete` switches the export over
   * to the target under its open connections; `cancel` leaves the source in use (after `ready`,
   * the target a consistent point-in-time copy; before, a target the job created is deleted).
   */
  live?: boolean;
  /**
   * A live copy's writes: `background` (default) acknowledges a guest write once the source has
   * it and copies it later; `write-blocking` writes an already-copied range to both sides before
   * acknowledging, so the copy converges under any write rate.
   */
  mode?: 'background' | 'write-blocking';
  /**
   * An incremental copy: the target already holds the data of the source volume's snapshot of
   * this name, and only what changed since then is copied (the source backend's `data.dirty`).
   * The source may be a later snapshot (`vol@s2`) or the volume itself.
   */
  since?: string;
}

/** What a group instant clone takes. */
export interface InstantCloneOptions {
  speed?: number;
  owner?: string;
  copyOnRead?: boolean;
}

/** What a group live copy takes (CopyOptions' live-copy part). */
export interface LiveCopyOptions {
  mode?: 'background' | 'write-blocking';
  speed?: number;
  /**
   * Copy on from where an earlier live copy left (the id of a mirror job cancelled after ready, or
   * suspended when its service stopped): its pairs, each from the snapshot of its source it left
   * and what its target was still behind on there. Pairs: none, or the same.
   */
  resume?: string;
}

/** `volumes.exportTo`: the file is created (relative paths resolve against the working folder). */
export interface FileExportOptions {
  /** `raw` (the default, as for `qemu-img convert`), `qcow2`, or a format a plugin adds. */
  format?: string;
  /** Replace the file if it exists (otherwise AlreadyExists). */
  overwrite?: boolean;
  /** Rate limit in bytes/s (0 = unlimited). */
  speed?: number;
  /** Compare checksums of the volume and the file after the copy. */
  verify?: boolean;
}

/** `volumes.importFrom`: bytes of the volume past the file's size are left as they are. */
export interface FileImportOptions {
  /** The file's format; probed when absent (qcow2 by its magic, else raw). */
  format?: string;
  /** Create the volume with the file's virtual size when it does not exist (otherwise NotFound). */
  create?: boolean;
  /** With `create`: the tenant that owns the new volume (administrators only, as for `volumes.create`). */
  owner?: string;
  /** Rate limit in bytes/s (0 = unlimited). */
  speed?: number;
  /** Compare checksums of the file and the volume after the copy. */
  verify?: boolean;
}

/**
 * A clone as started: a native clone is done at once (`volume`); a clone through the host is a job
 * (`job`: progress, cancel, resume) whose target exists once the job has created it.
 */
export type CloneStart = { volume: Volume; job?: undefined } | { job: Job; volume?: undefined };

/** A point of a backup (`backups.list`): the backup volume's snapshot `bN`. */
export interface BackupPoint {
  /** `backend/name@bN`: what `restore` takes. */
  ref: string;
  point: number;
  sizeBytes: number;
  createdAt?: string;
}

/**
 * Incremental backup into a backup volume whose snapshots are the points (core/broker/backups.ts):
 * the first point is a full copy, each later one moves only what changed since the previous one.
 */
export interface BackupsApi {
  /** Take the next point of `source` in the backup volume `to` (created at the first), as a job. */
  start(source: string, opts: { to: string; speed?: number }): Promise<Job>;
  /**
   * The next point of several volumes (the disks of one VM) as one job: their markers are taken at
   * one instant (the clients of this broker's exports of them held meanwhile), and the points are
   * made all or none.
   */
  startGroup(pairs: { source: string; to: string }[], opts?: { speed?: number }): Promise<Job>;
  /** The points of a backup volume, oldest first. */
  list(target: string): Promise<BackupPoint[]>;
  /** Copy a point (`backend/name@bN`, or `backend/name` for the latest) into a volume: created when missing, overwritten otherwise. */
  restore(point: string, opts: { to: string; speed?: number }): Promise<Job>;
}

/** What Broker.reconfigure changed, and what it could not. */
export interface Reconfigured {
  /** Backends new to the config, made. */
  added: string[];
  /** Backends whose entries changed, made anew: operations from now on use them (one this broker uses — an export, a job — is `kept` instead until they end). */
  replaced: string[];
  /** Backends left out of the config, taken away. */
  removed: string[];
  /** Backends left out of the config, or whose entries changed, that stay as they are while this broker uses them (an export, a job: `reason`). */
  kept: { name: string; reason: string }[];
  /** Entries (a backend's name, or `nbd.tls`) that could not be used: the ones in use stay. */
  failed: { name: string; reason: string }[];
  /** Settings changed that take a restart (`state`, `server`, `hostId`, `leaseSeconds`, `lockWaitSeconds`, `jobRetentionDays`, `nbd.tls` turned on, off or to another kind): the ones in use stay. */
  restartNeeded: string[];
}

export interface Broker {
  readonly principal: Principal;
  /** A view of the same broker acting as another principal. */
  as(principal: Principal): Broker;
  backends(): Promise<BackendInfo[]>;
  backend(name: string): StorageBackend;
  /**
   * Use a changed config without a restart (administrators): backends added, changed (made anew)
   * and taken away, `nbd.tls`'s settings; a config that does not validate is a ConfigError and
   * changes nothing. See Reconfigured. A service reads its config file again on SIGHUP.
   */
  reconfigure(config: string | RawConfig, opts?: { env?: NodeJS.ProcessEnv }): Promise<Reconfigured>;
  readonly volumes: VolumesApi;
  readonly snapshots: SnapshotsApi;
  readonly backups: BackupsApi;
  /** Clone a volume or snapshot into a new volume (on the same backend, or through the host); resolves when it is complete. */
  clone(source: string, target: string, opts?: CloneOptions): Promise<Volume>;
  /** The same, without waiting for a clone through the host: its job is returned at once. */
  startClone(source: string, target: string, opts?: CloneOptions): Promise<CloneStart>;
  /** Make a volume independent of its parent (or of everything above `base`). */
  stream(ref: string, opts?: { base?: string; speed?: number }): Promise<Job>;
  /** Merge a volume's changes into its parent (or `base`). */
  commit(ref: string, opts?: { base?: string; speed?: number }): Promise<Job>;
  /**
   * Copy a volume's data into another existing volume, wherever they are, through the host. A
   * point-in-time copy: the source must not be written meanwhile — or, with `live`, a copy of a
   * volume in use that ends by switching its export over (CopyOptions.live).
   */
  copy(source: string, target: string, opts?: CopyOptions): Promise<Job>;
  /**
   * Live copy of several volumes in use as one job (the disks of one VM): each SRC exported
   * read-write here, `ready` when every target is in sync, `complete` switches every export over
   * after one record (all or none), `cancel` leaves every source in use. `copy(…, { live })` is
   * the one-pair case.
   */
  liveCopy(pairs: { source: string; target: string }[], opts?: LiveCopyOptions): Promise<Job>;
  /**
   * Instant clones of several volumes as one job (the disks of one VM): every target created and
   * usable at once, one fill job for all (cancel abandons all). `startClone(…, { instant })` is
   * the one-pair case.
   */
  instantClone(pairs: { source: string; target: string }[], opts?: InstantCloneOptions): Promise<Job>;
  /** Explain how an operation would run, without running it. */
  plan(op: Operation): Promise<Plan>;
  readonly jobs: JobsApi;
  readonly locks: LocksApi;
  /** NBD exports of volumes (`offload nbd`). */
  readonly exports: ExportsApi;
  /** Stop every export, finish or checkpoint running jobs, close the backends. */
  close(): Promise<void>;
}
