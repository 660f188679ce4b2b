/** The mock appliance's in-memory records and their JSON form in `<state>/state.json`. */
import { randomUUID } from 'node:crypto';
import type { BlockMap } from '../../appliance-kit/index.js';
import type { JobState } from '../api/schemas.js';

export interface SnapshotRecord {
  uuid: string;
  name: string;
  createTime: string;
  comment?: string;
  size: number;
  map: BlockMap;
}

export interface SplitRecord {
  jobUuid: string;
  /** Chunks still shared with the parent snapshot: [index, chunk id at split start]. */
  pending: [number, number][];
  totalBytes: number;
  copiedBytes: number;
  /** Bytes the rate allows but not yet spent (less than one chunk). */
  credit: number;
}

export interface CloneRecord {
  parentVolumeUuid: string;
  parentVolumeName: string;
  parentSnapshotUuid: string;
  parentSnapshotName: string;
  /** The parent snapshot was created for this clone (no `parent_snapshot` given); removed with it. */
  autoSnapshot: boolean;
  split?: SplitRecord;
}

export interface VolumeRecord {
  uuid: string;
  name: string;
  svm: string;
  size: number;
  createTime: string;
  comment?: string;
  map: BlockMap;
  snapshots: SnapshotRecord[];
  clone?: CloneRecord;
}

export interface JobRecord {
  uuid: string;
  description: string;
  svm?: string;
  state: JobState;
  message: string;
  code?: number;
  error?: { code: string; message: string };
  createdAt: number;
  startTime?: string;
  endTime?: string;
  endedAt?: number;
  /** Job GETs so far (for `jobFailure` after N polls). */
  polls: number;
  kind: 'op' | 'split';
  volumeUuid?: string;
  /** Injected behaviour: fail after N polls, never finish, or vanish. */
  failAfterPolls?: number;
  failure?: { code: string; message: string };
  stuck?: boolean;
  expired?: boolean;
}

type Pairs = [number, number][];
export interface SavedState {
  version: 1;
  nextChunkId: number;
  volumes: (Omit<VolumeRecord, 'map' | 'snapshots'> & { map: Pairs; snapshots: (Omit<SnapshotRecord, 'map'> & { map: Pairs })[] })[];
  jobs: JobRecord[];
}

export function toSaved(volumes: Iterable<VolumeRecord>, jobs: Iterable<JobRecord>, nextChunkId: number): SavedState {
  return {
    version: 1,
    nextChunkId,
    volumes: [...volumes].map((v) => ({
      ...v,
      map: [...v.map.entries()],
      snapshots: v.snapshots.map((s) => ({ ...s, map: [...s.map.entries()] })),
    })),
    jobs: [...jobs],
  };
}

export function fromSaved(saved: SavedState): { volumes: VolumeRecord[]; jobs: JobRecord[] } {
  return {
    volumes: saved.volumes.map((v) => ({
      ...v,
      map: new Map(v.map),
      snapshots: v.snapshots.map((s) => ({ ...s, map: new Map(s.map) })),
    })),
    jobs: saved.jobs,
  };
}

/** A new job record, queued, carrying what fault injection asked of it. */
export function newJobRecord(description: string, svm: string, fault: { failAfterPolls?: number; failure?: { code: string; message: string }; stuck?: boolean; expired?: boolean }): JobRecord {
  return { uuid: randomUUID(), description, svm, state: 'queued', message: 'Queued', createdAt: Date.now(), polls: 0, kind: 'op', ...fault };
}

/** End a job: success, or failure with its ONTAP code and message. */
export function finishJob(job: JobRecord, failure?: { code: string; message: string }): void {
  const now = Date.now();
  job.state = failure ? 'failure' : 'success';
  job.message = failure ? failure.message : 'success';
  job.code = failure ? Number(failure.code) : 0;
  if (failure) job.error = { ...failure };
  job.startTime ??= new Date(now).toISOString();
  job.endTime = new Date(now).toISOString();
  job.endedAt = now;
}
