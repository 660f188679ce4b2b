/** The mock ONTAP's REST representation of its records (what GET answers). */
import type { ChunkStore } from '../../appliance-kit/index.js';
import type { Job, Snapshot, Volume } from '../api/schemas.js';
import type { JobRecord, SnapshotRecord, VolumeRecord } from './records.js';

/** A volume as `GET /api/storage/volumes/{uuid}` shows it; `unsplitBytes`: what a split would have to copy. */
export function volumeView(v: VolumeRecord, store: ChunkStore, unsplitBytes: number): Volume {
  const clone: NonNullable<Volume['clone']> = { is_flexclone: v.clone !== undefined };
  if (v.clone) {
    clone.parent_volume = { name: v.clone.parentVolumeName, uuid: v.clone.parentVolumeUuid };
    clone.parent_snapshot = { name: v.clone.parentSnapshotName, uuid: v.clone.parentSnapshotUuid };
    clone.split_initiated = v.clone.split !== undefined;
    if (v.clone.split) {
      clone.split_complete_percent = percent(v.clone.split.copiedBytes, v.clone.split.totalBytes);
      clone.split_estimate = Math.max(0, v.clone.split.totalBytes - v.clone.split.copiedBytes);
    } else {
      // What a split would have to copy: the chunks still shared with the parent snapshot.
      clone.split_estimate = unsplitBytes;
    }
  }
  return {
    uuid: v.uuid,
    name: v.name,
    svm: { name: v.svm },
    size: v.size,
    state: 'online',
    type: 'rw',
    style: 'flexvol',
    create_time: v.createTime,
    ...(v.comment !== undefined ? { comment: v.comment } : {}),
    space: { size: v.size, used: store.allocatedBytes(v.map) },
    clone,
    _links: { self: { href: `/api/storage/volumes/${v.uuid}` } },
  };
}

export function snapshotView(v: VolumeRecord, s: SnapshotRecord): Snapshot {
  return {
    uuid: s.uuid,
    name: s.name,
    create_time: s.createTime,
    ...(s.comment !== undefined ? { comment: s.comment } : {}),
    volume: { name: v.name, uuid: v.uuid },
    logical_size: s.size,
    _links: { self: { href: `/api/storage/volumes/${v.uuid}/snapshots/${s.uuid}` } },
  };
}

export function jobView(j: JobRecord): Job {
  return {
    uuid: j.uuid,
    description: j.description,
    state: j.state,
    message: j.message,
    ...(j.code !== undefined ? { code: j.code } : {}),
    ...(j.error ? { error: j.error } : {}),
    ...(j.startTime ? { start_time: j.startTime } : {}),
    ...(j.endTime ? { end_time: j.endTime } : {}),
    ...(j.svm ? { svm: { name: j.svm } } : {}),
    _links: { self: { href: `/api/cluster/jobs/${j.uuid}` } },
  };
}

export function percent(done: number, total: number): number {
  return total === 0 ? 100 : Math.min(100, Math.floor((done * 100) / total));
}
