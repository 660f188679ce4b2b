import type { CapabilitySet } from '../model/capabilities.js';
import type { Page, PageRequest, Snapshot, Volume } from '../model/types.js';
import type { JobTask } from '../jobs/job-task.js';
import type { BlockDevice } from './block-device.js';

export interface CreateVolumeRequest {
  name: string;
  /** Size in bytes. For a clone, absent means the source's size; smaller than the source is OutOfRange. */
  sizeBytes?: number;
  /** Clone from a volume (or one of its snapshots) on the same backend. */
  source?: { volume: string; snapshot?: string };
  /** How to clone: share data with the source (`linked`) or own all of it (`full`). */
  mode?: 'linked' | 'full';
  /** The principal the volume belongs to. */
  owner?: string;
}

/** `data.dirty`: which two points of a volume to compare, and over which range. */
export interface ChangedExtentsRequest {
  /** The earlier point: a snapshot of the volume. */
  since: string;
  /** The later point: a snapshot of the volume taken after `since`; absent = the volume's data now. */
  until?: string;
  /** The range to answer for (default: the whole volume at `until`). */
  offset?: number;
  length?: number;
}

/**
 * The answer of `changedExtents`: every byte outside `extents` reads the same at `until` as at
 * `since`; a byte inside may differ (a backend may over-report, never under-report). Extents are
 * sorted, do not overlap, lie within the asked range and are multiples of `granularity` except
 * where clipped to the range.
 */
export interface ChangedExtents {
  extents: { offset: number; length: number }[];
  /** The unit the backend tracks changes in (a cluster, a chunk, a block). */
  granularity: number;
  /** The volume's size at `until`. */
  sizeBytes: number;
}

export interface StreamOptions {
  /** Stop at this ancestor (a volume or snapshot name in the chain); absent = make it independent. */
  base?: string;
}

export interface CommitOptions {
  /** Commit into this ancestor; absent = the direct parent. */
  base?: string;
}

/**
 * The capability interface every backend implements. Semantics follow CSI where it speaks:
 * create is idempotent by name (same name and compatible arguments → the same volume, else
 * AlreadyExists); deleting what is gone succeeds; deleting a volume others depend on is
 * FailedPrecondition and changes nothing; a missing source is NotFound; growing is allowed and
 * shrinking is OutOfRange. Names reaching a backend have already been validated by the broker.
 * A volume's `id`, where given, is the same in every answer about it and differs for a volume
 * deleted and made again under its name (a live copy's crash record is checked against it).
 */
export interface StorageBackend {
  readonly name: string;
  readonly kind: string;
  capabilities(): Promise<CapabilitySet>;

  createVolume(req: CreateVolumeRequest): Promise<Volume>;
  getVolume(name: string): Promise<Volume | undefined>;
  listVolumes(page?: PageRequest): Promise<Page<Volume>>;
  resizeVolume(name: string, sizeBytes: number): Promise<Volume>;
  deleteVolume(name: string): Promise<void>;

  createSnapshot(volume: string, name: string): Promise<Snapshot>;
  listSnapshots(volume: string): Promise<Snapshot[]>;
  deleteSnapshot(volume: string, name: string): Promise<void>;
  revertVolume(volume: string, snapshot: string): Promise<void>;

  /** `chain.stream`: a task that makes the volume independent of its parent (up to `base`). */
  streamVolume?(name: string, opts: StreamOptions): Promise<JobTask>;
  /** `chain.commit`: a task that merges the volume's changes into its parent (or `base`). */
  commitVolume?(name: string, opts: CommitOptions): Promise<JobTask>;
  /** `data.*`: open the volume's data path. */
  openVolume?(name: string, mode: 'r' | 'rw'): Promise<BlockDevice>;
  /**
   * `data.read` with the limit `snapshots: true`: a snapshot's data path, read-only (what a copy
   * or clone through the host reads from a snapshot).
   */
  openSnapshot?(volume: string, snapshot: string): Promise<BlockDevice>;
  /**
   * `data.dirty`: the ranges whose data changed between the snapshot `since` and `until` (a later
   * snapshot, or the volume now). An unknown volume or snapshot is NotFound; `until` older than
   * `since` is InvalidArgument; when the backend cannot tell what changed (a bitmap left
   * inconsistent by a crash, a snapshot from before tracking began) it is FailedPrecondition with
   * the reason — never a guess that may leave a change out.
   */
  changedExtents?(volume: string, req: ChangedExtentsRequest): Promise<ChangedExtents>;
  /**
   * Rebuild a task of this backend from its stored type and params after a broker restart.
   * Return undefined when it cannot be resumed; the job is then concluded as interrupted.
   */
  resumeTask?(type: string, params: Record<string, unknown>): Promise<JobTask | undefined>;

  close?(): Promise<void>;
}
