import { holderKind, type LockInfo, type LockMode, type LockRequest } from './lock-manager.js';
import { snapshotVolume } from './whole-volume.js';

/**
 * A disk in use — a volume a VM writes through its writable export, moved by a live copy, made by
 * a fill — and the points of it read meanwhile (a clone or copy of a snapshot, an export of one):
 * a snapshot is frozen, so its readers and what the disk is in use through work within each
 * other's locks (LockHolder.within), whichever starts first, in one process or several. The
 * volume's other keepers stay: it is not deleted, reverted or resized under a reader.
 */

/** Whether a holder of `mode` with this id is what a disk in use works through: its writable export, a live copy, a fill (jobs known by the type their ids begin with). */
export function usesDisk(mode: LockMode, id: string): boolean {
  if (mode !== 'exclusive') return false;
  const h = holderKind(id);
  return h.kind === 'export' || (h.kind === 'job' && DISK_IN_USE_JOBS.some((type) => id.startsWith(`${type}-`)));
}
const DISK_IN_USE_JOBS = ['mirror', 'fill'];

/** The volumes whose snapshots `locks` read: each held shared with a snapshot of it, none of them exclusively. */
export function snapshotsRead(locks: readonly LockRequest[]): string[] {
  const volumes = new Set(locks.filter((l) => l.mode === 'shared').map((l) => snapshotVolume(l.key)).filter((v): v is string => v !== undefined));
  return [...volumes].filter((v) => locks.some((l) => l.key === v && l.mode === 'shared') && !locks.some((l) => l.mode !== 'shared' && (l.key === v || l.key.startsWith(`${v}@`))));
}

/** The holders in `held` (every lock, here and elsewhere) that a reader of snapshots of `volumes` works within. */
export function diskUsers(held: readonly LockInfo[], volumes: readonly string[]): string[] {
  return [...new Set(held.filter((l) => volumes.includes(l.key) && usesDisk(l.mode, l.holder.id)).map((l) => l.holder.id))];
}

/** The holders in `held` reading a snapshot of `volume`, which what makes it a disk in use works within. */
export function snapshotReadersIn(held: readonly LockInfo[], volume: string): string[] {
  const byHolder = new Map<string, LockRequest[]>();
  for (const l of held) if (l.mode !== 'maintenance') byHolder.set(l.holder.id, [...(byHolder.get(l.holder.id) ?? []), { key: l.key, mode: l.mode }]);
  return [...byHolder].filter(([, locks]) => snapshotsRead(locks).includes(volume)).map(([id]) => id);
}
