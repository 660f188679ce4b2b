import { performance } from 'node:perf_hooks';
import type { LockMode, LockRequest, Outside } from '../locks/lock-manager.js';
import { snapshotVolume } from '../locks/whole-volume.js';

/**
 * How long a short operation's published locks stay in the shared state after their claim, for
 * the next operations of this broker on the same volumes to use without a round trip. It bounds
 * two waits: another broker's operation on such a volume waits for the claim to lapse (it polls),
 * and placing a maintenance lock waits this long so that no claim made before it is used after.
 */
export const CLAIM_HOLD_MS = 50;

/** A claim as the store made it: what others held at that moment, the owners of its keys, and the removal of its rows. */
export interface Claimed {
  /** The operation id its rows carry. */
  id: string;
  outside: Outside;
  /** Owner records of the claimed keys as read with the claim (a key without one is absent). */
  owners: Record<string, string>;
  /** What others hold now, leaving out claims made after this one (Publish.recheck). */
  recheck?: () => Promise<Outside>;
  /** The volumes it holds exclusively whose snapshots nobody else held: it covers requests on those too (whole-volume.ts). */
  wholeVolumes?: string[];
}

interface Claim {
  id: string;
  locks: LockRequest[];
  /** performance.now() after which no operation may start under it. */
  validUntil: number;
  /** Operations running under it: its rows stay while there are any. */
  users: number;
  /** Its first operation has not found it clear yet: not for others to use. */
  pending: boolean;
  expired: boolean;
  /** Owner records of its keys as of the claim, kept up to date by this broker's own writes (null: none). */
  owners: Map<string, string | null>;
  /** Claimed.wholeVolumes. */
  wholes: ReadonlySet<string>;
}

/**
 * The claims of this broker's short operations, kept after the operations end, as a cluster
 * filesystem's lock manager caches a lock on a node that used it: create, snapshot and delete of
 * one volume then cost one round trip to the shared state, not one each (bench/service.ts).
 *
 * Why it is safe: while a claim's rows are in the store, every other broker that claims a
 * conflicting lock (operation, job or export) sees them and backs off or waits, so nothing that
 * conflicts can have started since the claim was checked. The one thing a claim does not keep out
 * is a maintenance lock, which is placed without waiting for operations: hence claims lapse after
 * CLAIM_HOLD_MS, and placing one waits that long (`SharedLocks.placeMaintenance`). A claim covers a
 * request when it holds the request's key in a mode at least as strong (exclusive covers shared),
 * or holds the volume of a snapshot key whole (`Claimed.wholeVolumes`, whole-volume.ts).
 * The broker's own lock manager still orders its operations; these rows are for the others.
 *
 * For the same reason the owner record of a claimed volume can change only through this broker
 * while the claim stands (owners change under an exclusive lock), so a claim reads the owners of
 * its keys along with the holders, and answers `owner` until it lapses.
 *
 * A claim that waits in line (Publish.recheck) forgets the owners it read: the operation it waits
 * for may change them.
 *
 * Lapsed claims are swept together, their rows removed by one `withdrawMany`.
 */
export class OpClaims {
  private readonly byKey = new Map<string, Claim[]>();
  private readonly cached = new Set<Claim>();
  private sweeper: NodeJS.Timeout | undefined;
  private closed = false;

  constructor(
    /** Remove the rows of claims (by id), in one step. */
    private readonly withdrawMany: (ids: string[]) => Promise<void>,
    private readonly holdMs = CLAIM_HOLD_MS,
  ) {}

  /**
   * Claim `locks` for one operation: from cached claims if they cover all of them (no round trip,
   * and nothing held outside, as argued above), else through `claim` (the store's), whose result
   * is cached once the operation is done with it. The result's `withdraw` removes a claim that
   * found a conflict; `done` ends the operation's use of it.
   */
  async claim(locks: LockRequest[], claim: () => Promise<Claimed>): Promise<{ outside: Outside; withdraw: () => Promise<void>; done: () => Promise<void>; recheck?: () => Promise<Outside> }> {
    const covering = this.covering(locks);
    if (covering) {
      for (const c of covering) c.users++;
      const done = once(async () => {
        for (const c of covering) this.unuse(c);
      });
      return { outside: { foreign: [], maintenance: [] }, withdraw: done, done };
    }
    const sent = performance.now();
    const claimed = await claim();
    const c: Claim = {
      id: claimed.id, locks, validUntil: sent + this.holdMs, users: 1, pending: true, expired: false, wholes: new Set(claimed.wholeVolumes),
      // Read while another's operation held a key: it may be changing them (the store is asked).
      owners: new Map(claimed.outside.foreign.length > 0 ? [] : locks.map((l) => [l.key, claimed.owners[l.key] ?? null])),
    };
    for (const k of claimKeys(c)) this.byKey.set(k, [...(this.byKey.get(k) ?? []), c]);
    let ended = false;
    const remove = async () => {
      c.users = 0;
      this.drop(c);
      await this.withdrawMany([c.id]);
    };
    const recheck = claimed.recheck;
    return {
      outside: claimed.outside,
      // Waiting in line: what it read of the owners may change meanwhile (the store is asked).
      ...(recheck ? { recheck: () => { c.owners.clear(); return recheck(); } } : {}),
      // It met a conflict: gone at once, never used again.
      withdraw: async () => {
        if (ended) return;
        ended = true;
        await remove();
      },
      done: async () => {
        if (ended) return;
        ended = true;
        // Not kept when this broker is closing, nor when it passed a maintenance lock (an
        // administrator's claim): covering others' requests, it would let a tenant through.
        // Nor one that lapsed while it waited in line: its rows would only hold the next in line.
        // Nor one that went ahead beside other processes' holders (within them: a reader of a
        // disk in use's points): covering the next requests, it would let them past those holders.
        if (this.closed || c.expired || c.validUntil <= performance.now() || claimed.outside.maintenance.length > 0 || claimed.outside.foreign.length > 0) return remove();
        c.pending = false;
        this.cached.add(c);
        this.sweepLater();
        this.unuse(c);
      },
    };
  }

  /** The owner record of `key` as a live claim of this broker knows it: a string, null for none, undefined if no claim knows. */
  owner(key: string): string | null | undefined {
    const now = performance.now();
    for (const c of this.byKey.get(key) ?? []) if (!c.expired && c.validUntil > now && c.owners.has(key)) return c.owners.get(key);
    return undefined;
  }

  /**
   * This broker changed the owner record of `key` (null: removed): what its claims know follows.
   * undefined: a write whose outcome is not known (it failed): they forget it, and the store is asked.
   */
  noteOwner(key: string, owner: string | null | undefined): void {
    for (const c of this.byKey.get(key) ?? []) {
      if (owner === undefined) c.owners.delete(key);
      else c.owners.set(key, owner);
    }
  }

  /** Drop every cached claim at once, and keep none from now on (the broker is closing): their rows are removed. */
  async clear(): Promise<void> {
    this.closed = true;
    if (this.sweeper) clearTimeout(this.sweeper);
    this.sweeper = undefined;
    await this.sweep(Infinity);
  }

  /** Cached claims that cover every request, if there are. */
  private covering(locks: LockRequest[]): Claim[] | undefined {
    const now = performance.now();
    const out = new Set<Claim>();
    const live = (c: Claim) => !c.pending && !c.expired && c.validUntil > now;
    for (const l of locks) {
      const volume = snapshotVolume(l.key);
      const c = this.byKey.get(l.key)?.find((c) => live(c) && c.locks.some((h) => h.key === l.key && covers(h.mode, l.mode)))
        ?? (volume === undefined ? undefined : this.byKey.get(volume)?.find((c) => live(c) && c.wholes.has(volume)));
      if (!c) return undefined;
      out.add(c);
    }
    return out.size > 0 ? [...out] : undefined;
  }

  private unuse(c: Claim): void {
    c.users--;
    if (c.expired && c.users === 0) void this.withdrawMany([c.id]);
  }

  private sweepLater(): void {
    if (this.sweeper) return;
    this.sweeper = setTimeout(() => {
      this.sweeper = undefined;
      void this.sweep(performance.now());
      if (this.cached.size > 0) this.sweepLater();
    }, this.holdMs);
    this.sweeper.unref();
  }

  /** Expire the cached claims lapsed by `now`; remove the rows of those no operation uses, together. */
  private async sweep(now: number): Promise<void> {
    const free: string[] = [];
    for (const c of this.cached) {
      if (c.validUntil > now) continue;
      this.drop(c);
      if (c.users === 0) free.push(c.id);
    }
    if (free.length > 0) await this.withdrawMany(free);
  }

  private drop(c: Claim): void {
    c.expired = true;
    this.cached.delete(c);
    for (const k of claimKeys(c)) {
      const left = (this.byKey.get(k) ?? []).filter((x) => x !== c);
      if (left.length > 0) this.byKey.set(k, left);
      else this.byKey.delete(k);
    }
  }
}

/** A claim's keys, once each (byKey lists a claim once under each). */
function claimKeys(c: Claim): Set<string> {
  return new Set(c.locks.map((l) => l.key));
}

function covers(held: LockMode, wanted: LockMode): boolean {
  return held === wanted || held === 'exclusive';
}

/** Waits until CLAIM_HOLD_MS have passed by performance.now() (a timer may fire a little early), and a little more. */
export async function waitOutClaims(): Promise<void> {
  const until = performance.now() + CLAIM_HOLD_MS + 2;
  for (let left = until - performance.now(); left > 0; left = until - performance.now()) await new Promise((r) => setTimeout(r, Math.ceil(left)));
}

function once(f: () => Promise<void>): () => Promise<void> {
  let p: Promise<void> | undefined;
  return () => (p ??= f());
}
