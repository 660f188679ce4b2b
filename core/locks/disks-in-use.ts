import { holderKind, type LockInfo, type LockMode, type LockRequest } from './lock-manager.js';

/**
 * A disk in use — a volume a VM writes through its writable export, moved by a live copy, made by
 * a fill — and the points of it read meanwhile (a clone or copy of a snapshot, an export of one):
 * a snapshot is frozen, so its readers and what the disk is in use through work within each
 * other's locks (LockHolder.within), whichever starts first, in one process or several. The
 * volume's other keepers stay: it is not deleted, reverted or resized under a reader.
 *
 * A holder that reads points of a volume and none of its moving data holds the key `VOLUME@`
 * (no snapshot has an empty name) shared besides, so that the others learn it from the lock rows
 * of any process: an incremental copy of the volume itself, which holds its base snapshot too,
 * does not. Within applies to all of a holder's locks, so only a holder that wants nothing else
 * the other holds (a target of both) is worked within.
 */

/** The key a reader of points of `volume` (and of nothing else of it) holds shared. */
export function pointsKey(volume: string): string {
  return `${volume}@`;
}

/** Whether a holder of `mode` with this id is what a disk in use works through: its writable export, a live copy, a fill (jobs known by the type their ids begin with). */
export function usesDisk(mode: LockMode, id: string): boolean {
  if (mode !== 'exclusive') return false;
  const h = holderKind(id);
  return h.kind === 'export' || (h.kind === 'job' && DISK_IN_USE_JOBS.some((type) => id.startsWith(`${type}-`)));
}
const DISK_IN_USE_JOBS = ['mirror', 'fill'];

const ofVolume = (key: string, volume: string) => key === volume || key.startsWith(`${volume}@`);

/** The volumes whose points `locks` read, and nothing else of them: `VOLUME@` held shared, nothing of the volume exclusively. */
export function snapshotsRead(locks: readonly { key: string; mode: LockMode }[]): string[] {
  return locks.filter((l) => l.mode === 'shared' && l.key.endsWith('@')).map((l) => l.key.slice(0, -1))
    .filter((v) => !locks.some((l) => l.mode !== 'shared' && ofVolume(l.key, v)));
}

/** The locks of each holder in `held`, by holder id. */
function byHolder(held: readonly LockInfo[]): Map<string, LockInfo[]> {
  const out = new Map<string, LockInfo[]>();
  for (const l of held) out.set(l.holder.id, [...(out.get(l.holder.id) ?? []), l]);
  return out;
}

/**
 * Whether a holder with `locks` and one wanting `wanted` meet on no key but `volumes` (where the
 * one is in use and the other reads its points): another key both hold, one of them exclusively
 * (a target of both, a snapshot one of them drops), keeps them apart as before.
 */
function apartBut(locks: readonly LockInfo[], wanted: readonly LockRequest[], volumes: readonly string[]): boolean {
  return locks.every((l) => volumes.includes(l.key) || !wanted.some((w) => w.key === l.key && (w.mode !== 'shared' || l.mode !== 'shared')));
}

/** The holders in `held` (every lock, here and elsewhere) that a holder of `wanted`, reading points of `volumes`, works within. */
export function diskUsers(held: readonly LockInfo[], volumes: readonly string[], wanted: readonly LockRequest[]): string[] {
  if (volumes.length === 0) return [];
  return [...byHolder(held)].filter(([id, locks]) => locks.some((l) => volumes.includes(l.key) && usesDisk(l.mode, id)) && apartBut(locks, wanted, volumes))
    .map(([id]) => id);
}

/** The holders in `held` reading points of `volumes` that a holder of `wanted` making them disks in use (their writable export, a live copy of them) works within. */
export function snapshotReadersIn(held: readonly LockInfo[], volumes: readonly string[], wanted: readonly LockRequest[]): string[] {
  return [...byHolder(held)].filter(([, locks]) => snapshotsRead(locks as { key: string; mode: LockMode }[]).some((v) => volumes.includes(v)) && apartBut(locks, wanted, volumes))
    .map(([id]) => id);
}
