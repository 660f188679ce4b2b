import { holderKind, type LockHolder, type LockMode, type LockRequest, type Outside } from './lock-manager.js';

/**
 * A broker's short operation that holds a volume exclusively holds its snapshots too, for the
 * other brokers: their requests on `backend/volume@snap` meet it as on the snapshot's own key. So
 * a claim on a volume whose snapshots nobody else held when it was made covers this broker's next
 * requests on them (OpClaims): a volume's create, snapshot and snapshot delete are one claim.
 * Only short operations: an export or a job holding a volume for hours does not keep the others'
 * backups off its snapshots. Within one broker nothing changes: its lock manager orders its own
 * requests key by key.
 */

/** The volume key of a snapshot's lock key (`b/v@s` → `b/v`); undefined for any other key (a volume's, a file's). */
export function snapshotVolume(key: string): string | undefined {
  if (key.includes(':')) return undefined; // `file:…`: names have no colon
  const at = key.indexOf('@');
  return at > 0 && key.lastIndexOf('/', at) > 0 ? key.slice(0, at) : undefined;
}

function isVolumeKey(key: string): boolean {
  return !key.includes(':') && !key.includes('@') && key.includes('/');
}

/** The keys whose holders a check of `keys` reads: they, and the volumes of snapshot keys among them. */
export function keysToRead(keys: readonly string[]): string[] {
  const out = new Set(keys);
  for (const k of keys) {
    const v = snapshotVolume(k);
    if (v !== undefined) out.add(v);
  }
  return [...out];
}

/** The prefixes of the snapshot keys of the volumes a claim of `locks` holds exclusively (`b/v@`): what it must read to cover them. */
export function snapshotPrefixes(locks: readonly LockRequest[]): string[] {
  return locks.filter((l) => l.mode === 'exclusive' && isVolumeKey(l.key)).map((l) => `${l.key}@`);
}

/**
 * The volumes of `locks` (held exclusively) whose snapshots nobody outside holds: the claim
 * covers this broker's requests on them. `outside` as read with the claim, by `snapshotPrefixes`.
 */
export function wholeVolumes(locks: readonly LockRequest[], outside: Outside): string[] {
  const taken = [...outside.foreign.map((f) => f.key), ...outside.maintenance.map((m) => m.key)];
  return snapshotPrefixes(locks).filter((p) => !taken.some((k) => k.startsWith(p))).map((p) => p.slice(0, -1));
}

type Foreign = { key: string; mode: LockMode; holder: LockHolder };

/**
 * `foreign` with, for each request on a snapshot key whose volume another broker's short
 * operation holds exclusively, that operation as holding the snapshot's key too.
 */
export function withWholeVolumes(foreign: Foreign[], keys: readonly string[]): Foreign[] {
  const extra: Foreign[] = [];
  for (const key of keys) {
    const volume = snapshotVolume(key);
    if (volume === undefined) continue;
    for (const f of foreign) {
      if (f.key === volume && f.mode === 'exclusive' && holderKind(f.holder.id).kind === 'operation') {
        extra.push({ key, mode: 'exclusive', holder: { ...f.holder, description: `${f.holder.description}, holding ${volume} and its snapshots` } });
      }
    }
  }
  return extra.length > 0 ? [...foreign, ...extra] : foreign;
}
