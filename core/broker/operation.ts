import { randomBytes } from 'node:crypto';
import { diskUsers, pointsKey, snapshotReadersIn, snapshotsRead, usesDisk } from '../locks/disks-in-use.js';
import type { HeldLock, LockHolder, LockRequest } from '../locks/lock-manager.js';
import type { Principal } from '../locks/principal.js';
import type { Capability, CapabilitySet } from '../model/capabilities.js';
import { InvalidArgument, Unsupported } from '../model/errors.js';
import { isSnapshotRef, snapshotKey, volumeKey, type Ref } from '../model/refs.js';
import type { Operation, Plan } from '../planner/plan.js';
import type { PlannerBackend } from '../planner/planner.js';
import type { BrokerState } from './state.js';

/** Largest size the broker accepts before asking the backend: a safe integer. */
const MAX_SAFE_SIZE = Number.MAX_SAFE_INTEGER;

/**
 * The plan of an operation, which is the one place capabilities are checked: an operation nothing
 * can run is Unsupported with the planner's reason, before anything is touched.
 */
export function planOrRefuse(s: BrokerState, op: Operation, what: string, ref: string): Plan {
  s.assertOpen();
  const plan = s.planner.plan(op);
  if (!plan.supported) throw new Unsupported(`cannot ${what}: ${plan.reason}`, { ref, hint: 'see `offload backends` for what each backend can do' });
  return plan;
}

/** Operation ids: unique across processes and hosts by their random prefix, then counted (a random id each cost ~17 µs). */
const OP_ID_PREFIX = `${randomBytes(5).toString('hex')}-`;
let opCount = 0;

/**
 * A short operation: serialised per volume in this process, its locks visible to other brokers
 * while it runs (they wait for it), and refused (Busy) while a job or an export holds a
 * conflicting lock. It returns once done here; its locks leave the shared state just after (in the
 * background: this broker ignores its own, another waits the moment it takes).
 */
export function runShort<T>(s: BrokerState, principal: Principal, locks: LockRequest[], description: string, fn: () => Promise<T>, within?: string[],
  o: { spares?: LockHolder['spares'] } = {}): Promise<T> {
  s.assertOpen();
  return s.mutex.run(locks.map((l) => l.key), async () => {
    const id = `op-${OP_ID_PREFIX}${(++opCount).toString(36)}`;
    const holder = { id, principal, description, ...(within && within.length > 0 ? { within } : {}), ...(o.spares ? { spares: o.spares } : {}) };
    const lease = await s.locks.acquirePublished(locks, holder, () => s.jobs.publishShort(id, locks, principal, description));
    try {
      return await fn();
    } finally {
      void lease.release();
    }
  });
}

/**
 * LockHolder.spares of a snapshot taken or deleted: what a disk in use works through, here or in
 * another process (usesDisk) — its writable export (the snapshot is made within it, or asked of
 * its process), a live copy moving it, a fill making it (the snapshot waits for them, or is Busy).
 */
export function sparesDisksInUse(held: HeldLock): boolean {
  return held.mode !== 'maintenance' && usesDisk(held.mode, held.holder.id);
}

/**
 * The locks a reader of `srcs` holds: each volume shared (not deleted, reverted or written over by
 * another under it), each snapshot it reads shared too (not deleted under it), and the points key
 * of a volume it reads only snapshots of (disks-in-use.ts) — not one a live copy makes and drops
 * itself (`live-…`, deleted under no lock of the reader's: its reader waits for the disk's users).
 */
export function readLocks(...srcs: Ref[]): LockRequest[] {
  const out = new Map<string, LockRequest>();
  const live = new Set(srcs.filter((r) => !isSnapshotRef(r)).map(volumeKey));
  for (const r of srcs) {
    const volume = volumeKey(r);
    out.set(volume, { key: volume, mode: 'shared' });
    if (!isSnapshotRef(r)) continue;
    out.set(snapshotKey(r), { key: snapshotKey(r), mode: 'shared' });
    if (!live.has(volume) && !r.snapshot.startsWith('live-')) out.set(pointsKey(volume), { key: pointsKey(volume), mode: 'shared' });
  }
  return [...out.values()];
}

/**
 * The holders a reader with `locks` works within (LockHolder.within), in this process or another:
 * what the volumes whose points it reads are in use through (disks-in-use.ts). A holder working
 * within another is not asked about the keys that one holds, so its locks' admission (a backend
 * being taken out of the config admits no new reader) is checked here.
 */
export async function readerWithin(s: BrokerState, locks: LockRequest[]): Promise<string[]> {
  const volumes = snapshotsRead(locks);
  if (volumes.length === 0) return [];
  const within = diskUsers(await s.locks.listOn([...new Set([...locks.map((l) => l.key), ...volumes])]), volumes, locks);
  if (within.length > 0) s.locks.assertAdmitted(locks);
  return within;
}

/** The holders reading points of `volumes`, here or in another process, that a holder of `wanted` — their writable export, a live copy of them — works within. */
export async function snapshotReaders(s: BrokerState, volumes: string[], wanted: LockRequest[]): Promise<string[]> {
  const keys = new Set([...wanted.map((l) => l.key), ...volumes, ...volumes.map(pointsKey)]);
  return snapshotReadersIn(await s.locks.listOn([...keys]), volumes, wanted);
}

/** A size a volume may have: a whole number of bytes, > 0, within the backend's stated maximum. */
export function checkSize(size: unknown, ref: string, caps: CapabilitySet): number {
  if (typeof size !== 'number' || !Number.isFinite(size) || !Number.isInteger(size)) {
    throw new InvalidArgument(`size of ${ref} must be a whole number of bytes, got ${JSON.stringify(size) ?? String(size)}`, { ref });
  }
  if (size <= 0) throw new InvalidArgument(`size of ${ref} must be greater than 0, got ${size}`, { ref });
  const max = caps.limits('volume.create')?.maxSizeBytes ?? MAX_SAFE_SIZE;
  if (size > max) throw new InvalidArgument(`size of ${ref} (${size} bytes) exceeds the backend's maximum of ${max} bytes`, { ref });
  return size;
}

/** A speed limit in bytes/s (0 = unlimited). */
export function checkSpeed(speed: unknown): number | undefined {
  if (speed === undefined) return undefined;
  if (typeof speed !== 'number' || !Number.isFinite(speed) || speed < 0) throw new InvalidArgument(`speed must be ≥ 0 bytes/s, got ${String(speed)}`);
  return speed;
}

/** A backend that has `cap` (for the verbs the planner does not plan: listing, opening). */
export function need(s: BrokerState, name: string, cap: Capability): PlannerBackend {
  const b = s.entry(name);
  if (!b.capabilities.has(cap)) {
    throw new Unsupported(`${name} (${b.backend.kind}) does not support ${cap}`, { ref: name, hint: 'see `offload backends` for what each backend can do' });
  }
  return b;
}
