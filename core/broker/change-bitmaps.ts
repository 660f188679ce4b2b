/**
 * NBD's `qemu:dirty-bitmap:NAME` from any backend with `data.dirty`: a read-only export of a
 * volume, or of its snapshot S2, also offers one bitmap per earlier snapshot S1 of the volume,
 * named `S1`, whose dirty ranges are what changed since S1 (up to S2) — the backend's own diff.
 * That is QEMU's incremental backup flow (export a point in time with the bitmap of what changed
 * since the last backup; the client copies only the dirty extents) for arrays and the pool alike.
 * The device's own persistent bitmaps (a qcow2 image's) come first; a snapshot of the same name
 * is not offered.
 */
import type { BlockDevice, ByteRange } from '../backend/block-device.js';
import { isSnapshotRef, type Ref } from '../model/refs.js';
import { call, type BrokerState } from './state.js';

export async function withChangeBitmaps(s: BrokerState, ref: Ref, device: BlockDevice): Promise<BlockDevice> {
  const b = s.entry(ref.backend);
  if (!b.capabilities.has('data.dirty') || !b.backend.changedExtents) return device;
  const text = `${ref.backend}/${ref.volume}`;
  const snaps = await call(b.backend, 'list snapshots of', text, () => b.backend.listSnapshots(ref.volume));
  // Earlier than the exported point by creation time (a backend lists in no promised order);
  // without times, every other snapshot is offered and the backend refuses a later one per request.
  const point = isSnapshotRef(ref) ? snaps.find((x) => x.name === ref.snapshot) : undefined;
  const earlier = snaps.filter((x) => x !== point && (point === undefined || point.createdAt === undefined || x.createdAt === undefined || x.createdAt < point.createdAt));
  const own = device.dirtyBitmaps?.() ?? [];
  const names = earlier.map((x) => x.name).filter((n) => !own.includes(n));
  if (names.length === 0) return device;
  const until = isSnapshotRef(ref) ? ref.snapshot : undefined;
  // The device as it is (its optional methods, its live sizeBytes getter), with the two bitmap
  // methods answered here.
  return new Proxy(device, {
    get(target, prop, receiver) {
      if (prop === 'dirtyBitmaps') return () => [...(target.dirtyBitmaps?.() ?? []), ...names];
      if (prop === 'dirtyExtents') {
        return async (name: string, offset: number, length: number): Promise<ByteRange[]> => {
          if (!names.includes(name) || (target.dirtyBitmaps?.() ?? []).includes(name)) return target.dirtyExtents!(name, offset, length);
          const r = await call(b.backend, 'list the changes of', text, () => b.backend.changedExtents!(ref.volume, {
            since: name, ...(until !== undefined ? { until } : {}), offset, length,
          }));
          return r.extents;
        };
      }
      const v: unknown = Reflect.get(target, prop, receiver);
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
}
