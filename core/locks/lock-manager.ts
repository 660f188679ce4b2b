import { Busy, PermissionDenied } from '../model/errors.js';
import type { Principal } from './principal.js';

/**
 * Per-volume locks. `shared` for readers (a copy's source), `exclusive` for writers (stream,
 * commit, revert, resize, delete), `maintenance` placed by an administrator to keep tenants off.
 *
 * Rules:
 * - shared + shared is fine; every other pair of job locks conflicts → Busy naming the holder.
 * - a maintenance lock refuses every tenant request on the volume; administrators pass it.
 * - nothing a tenant holds can block an administrator: a tenant's conflicting lock is preempted
 *   (its holder is asked to stop, e.g. its job is cancelled) and the administrator's request
 *   proceeds once it is released.
 * - another broker's short operation holding a volume exclusively holds its snapshots' keys too
 *   (whole-volume.ts): the outside locks it is given say so.
 */
export type LockMode = 'shared' | 'exclusive' | 'maintenance';

export interface LockHolder {
  /** The job id (or a one-off operation id) holding the lock. */
  id: string;
  principal: Principal;
  /** What it is doing, for error messages: `stream local/vm1`. */
  description: string;
  /** Called when an administrator preempts this holder; should end it and release its locks. */
  preempt?: () => void;
  /**
   * The holders in its way that an administrator's request does not stop (it waits for them, or
   * is Busy, as a tenant's would): a snapshot taken or deleted spares the writable exports of
   * its volume — a disk in use, whose process makes it itself (broker/op-calls.ts) — and stops
   * a tenant's other holders as any request of an administrator does.
   */
  spares?: (held: HeldLock) => boolean;
  /**
   * The holder this one works within: their locks do not conflict, either way. A live copy within
   * the export whose writes it watches, that export within the live copy at the switch-over, an
   * export of an instant clone within the job that fills it.
   */
  within?: string | readonly string[];
}

/** Whether `h` works within the holder `id` (LockHolder.within). */
function isWithin(h: LockHolder, id: string): boolean {
  return h.within !== undefined && (typeof h.within === 'string' ? h.within === id : h.within.includes(id));
}

export interface LockInfo {
  key: string;
  mode: LockMode;
  holder: { id: string; principal: string; role: string; description: string };
}

export interface LockRequest {
  key: string;
  mode: Exclude<LockMode, 'maintenance'>;
}

export interface LockLease {
  release(): void;
}

/** A lease whose locks other brokers see too: its release withdraws them from the shared state. */
export interface PublishedLease {
  release(): Promise<void>;
}

/**
 * Make a holder's locks visible to the other brokers sharing the state and read what they hold,
 * as one step serialized with every other broker's: of two publishing at once, the later sees the
 * earlier's locks. `outside` excludes what was just published; `withdraw` removes it (after a
 * conflict, and when the holder is done unless `done` is given: what to do then instead).
 * `recheck`, where the store can order claims: what others hold now, leaving out the operations
 * published after this holder's locks (they saw these and wait for them): a holder that waits for
 * another broker's operation keeps its locks published meanwhile, and reads again with it.
 */
export type Publish = () => Promise<{ outside: Outside; withdraw: () => Promise<void>; done?: () => Promise<void>; recheck?: () => Promise<Outside> }>;

/** Locks held outside this broker, as SharedLocks.outside reads them. */
export interface Outside {
  foreign: { key: string; mode: LockMode; holder: LockHolder }[];
  maintenance: { key: string; principal: Principal; reason: string }[];
}

/** A maintenance lock placed in the shared state. */
export interface StoredLease {
  release(): Promise<void>;
}

export interface HeldLock {
  key: string;
  mode: LockMode;
  holder: LockHolder;
}
type Held = HeldLock;

/**
 * Locks held outside this process, so that brokers sharing a state store respect each other: the
 * jobs and operations of other live brokers, and maintenance locks (kept in the store so they
 * outlive the process that placed them).
 */
export interface SharedLocks {
  /** Other brokers' job and operation locks, and maintenance locks (all, or those on `keys`): one read of the shared state. */
  outside(keys?: string[]): Promise<Outside>;
  placeMaintenance(key: string, principal: Principal, reason: string): Promise<void>;
  removeMaintenance(key: string): Promise<void>;
}

/** Locks held outside, as this manager's entries. */
function held({ foreign, maintenance }: Outside): Held[] {
  return [
    ...foreign,
    ...maintenance.map((m) => ({
      key: m.key, mode: 'maintenance' as const,
      holder: { id: `maintenance:${m.key}`, principal: m.principal, description: `maintenance: ${m.reason}` },
    })),
  ];
}

/** Does a held lock of mode `held` conflict with a request of mode `wanted`? */
export function lockModesConflict(held: LockMode, wanted: LockMode): boolean {
  if (held === 'maintenance' || wanted === 'maintenance') return true;
  return !(held === 'shared' && wanted === 'shared');
}

/** Shared, exclusive and maintenance locks per volume, across the processes that share a state directory. */
function lockInfo(h: Held): LockInfo {
  return { key: h.key, mode: h.mode, holder: { id: h.holder.id, principal: h.holder.principal.id, role: h.holder.principal.role, description: h.holder.description } };
}

export class LockManager {
  private readonly held: Held[] = [];
  private readonly waiters = new Set<() => void>();

  /**
   * `waitMs`: how long an acquire waits for locks others hold before it is refused (default 30 s;
   * the config's lockWaitSeconds). `admit`: throws for requests this broker takes no more (a
   * backend being taken out of its config); a holder working within another is not asked about
   * the keys that one holds already.
   */
  constructor(private readonly shared?: SharedLocks, private readonly waitMs = 30_000, private readonly admit?: (requests: LockRequest[]) => void) {}

  /** Every lock held outside this broker: other brokers' jobs and operations, and maintenance locks. */
  private async outside(keys?: string[]): Promise<Held[]> {
    return this.shared ? held(await this.shared.outside(keys)) : [];
  }

  /** Locks currently held, for `offload locks` and tests. */
  async list(): Promise<LockInfo[]> {
    const outside = await this.outside();
    return [...this.held, ...outside].map(lockInfo);
  }

  /** `admit` for the keys a holder asks for that the holder it works within does not hold already (those are its work going on). */
  private admitNew(requests: LockRequest[], holder: LockHolder): void {
    if (!this.admit) return;
    this.admit(holder.within === undefined ? requests : requests.filter((r) => !this.held.some((h) => h.key === r.key && isWithin(holder, h.holder.id))));
  }

  /** Throws as acquiring these locks would for a backend being taken out of the config (`admit`), taking nothing. */
  assertAdmitted(requests: LockRequest[]): void {
    this.admit?.(requests);
  }

  /** The locks held on `keys`, by this broker and the others: one keyed read of the shared state. */
  async listOn(keys: string[]): Promise<LockInfo[]> {
    const on = (h: Held) => keys.includes(h.key);
    return [...this.held.filter(on), ...(await this.outside(keys)).filter(on)].map(lockInfo);
  }

  /** The locks this broker holds (its jobs, exports and operations), none of the others'. */
  heldHere(): LockInfo[] {
    return this.held.map(lockInfo);
  }

  /**
   * Take all requested locks at once or none. Rejects with Busy naming the conflicting holder;
   * waits (up to `preemptWaitMs`) for short operations holding them to end, and an administrator
   * for the tenant holders it preempts.
   */
  async acquire(requests: LockRequest[], holder: LockHolder, preemptWaitMs = this.waitMs): Promise<LockLease> {
    this.admitNew(requests, holder);
    const deadline = Date.now() + preemptWaitMs;
    for (let attempt = 0; ; ) {
      // Read what others hold, then check against this broker's locks and grant in one step (no
      // await between): two acquires of this process cannot both pass the check.
      const conflicts = this.conflicts(requests, holder, await this.outside(requests.map((r) => r.key)));
      if (conflicts.length === 0) return this.grant(requests.map((r) => ({ ...r, holder })));
      await this.stopOrRefuse(holder, conflicts, deadline, attempt++);
    }
  }

  /**
   * acquire, for a holder that other brokers must see while it holds its locks: granted here
   * first, then published (`publish`) and checked against what others hold as of that moment —
   * one round trip to the shared state instead of a read, then a checked write. On a conflict the
   * locks are withdrawn again before the holder is refused or waits for preempted tenants.
   */
  async acquirePublished(requests: LockRequest[], holder: LockHolder, publish: Publish, preemptWaitMs = this.waitMs): Promise<PublishedLease> {
    this.admitNew(requests, holder);
    const deadline = Date.now() + preemptWaitMs;
    for (let attempt = 0; ; ) {
      let conflicts = this.conflicts(requests, holder, []);
      if (conflicts.length === 0) {
        // Asked to stop while in line (an administrator here preempts a tenant): it leaves the line.
        let preempted = false;
        const here: LockHolder = { ...holder, preempt: () => { preempted = true; holder.preempt?.(); } };
        const lease = this.grant(requests.map((r) => ({ ...r, holder: here })));
        let published: Awaited<ReturnType<Publish>>;
        try {
          published = await publish();
        } catch (e) {
          lease.release();
          throw e;
        }
        const { withdraw } = published;
        try {
          for (let outside = published.outside; ;) {
            conflicts = this.conflicts(requests, holder, held(outside));
            if (conflicts.length === 0) {
              // Released here at once (this broker's checks ignore its own published locks), withdrawn from the shared state after.
              const done = published.done ?? withdraw;
              return { release: () => { lease.release(); return done(); } };
            }
            // In line: only other brokers' operations are in the way. This holder's locks stay
            // published while it waits, so a claim made after them waits for it in turn; withdrawn
            // and claimed again, a broker whose operations on a volume follow each other closely
            // would keep the volume from the others (its rows never leave), who give up after
            // `preemptWaitMs`. Held here meanwhile too (this broker's later requests wait behind
            // it), except from an administrator preempting a tenant: then out of line.
            if (!published.recheck || !conflicts.every((c) => !this.held.includes(c) && holderKind(c.holder.id).kind === 'operation')) break;
            await this.stopOrRefuse(holder, conflicts, deadline, attempt++);
            if (preempted) break;
            outside = await published.recheck();
          }
        } catch (e) {
          lease.release();
          await withdraw();
          throw e;
        }
        lease.release();
        await withdraw();
      }
      await this.stopOrRefuse(holder, conflicts, deadline, attempt++);
    }
  }

  /**
   * Conflicts found. Busy if one can be neither preempted nor waited for. A short operation
   * (`op-…`) ends by itself, or its lease runs out, so it is waited for, as this broker's keyed
   * mutex waits for its own; tenants an administrator preempts are asked to stop, then waited for.
   */
  private async stopOrRefuse(holder: LockHolder, conflicts: Held[], deadline: number, attempt: number): Promise<void> {
    const blocking = conflicts.filter((c) => holder.spares?.(c) === true || !this.canPreempt(holder.principal, c));
    // A job is named before an export of the same volume: a live copy is what holds it up.
    const refusing = blocking.find((c) => holderKind(c.holder.id).kind === 'job') ?? blocking.find((c) => holderKind(c.holder.id).kind !== 'operation');
    if (refusing) throw busyError(refusing);
    for (const c of conflicts) if (!blocking.includes(c)) c.holder.preempt?.();
    const remaining = deadline - Date.now();
    if (remaining <= 0) throw busyError(conflicts[0]!, blocking.length > 0 ? 'did not end in time' : 'did not stop in time after being preempted');
    // Held here: woken by the release. Held by another broker: polled, soon at first (its
    // operation may have ended already), then less often, jittered so that two brokers whose claims
    // met (each withdrew its own) do not meet again in step — and not woken by a release here,
    // which would send this broker's waiters at the other's lock one after another without a pause.
    const here = conflicts.every((c) => this.held.includes(c));
    if (here) await this.waitForChange(remaining);
    else await new Promise((r) => setTimeout(r, Math.min(remaining, (1 + Math.random()) * 2 ** Math.min(attempt, 7))));
  }

  /** Place a maintenance lock (administrators only). */
  async placeMaintenance(key: string, principal: Principal, reason: string): Promise<StoredLease> {
    if (principal.role !== 'admin') {
      throw new PermissionDenied(`only an administrator can place a maintenance lock on ${key}`, { ref: key });
    }
    const existing = [...this.held, ...(await this.outside([key]))].find((h) => h.key === key && h.mode === 'maintenance');
    if (existing) throw busyError(existing);
    if (this.shared) {
      await this.shared.placeMaintenance(key, principal, reason);
      return { release: () => this.shared!.removeMaintenance(key) };
    }
    const lease = this.grant([{ key, mode: 'maintenance', holder: { id: `maintenance:${key}`, principal, description: `maintenance: ${reason}` } }]);
    return { release: async () => lease.release() };
  }

  /** Break a maintenance lock (administrators only). Breaking one that is absent is fine. */
  async breakMaintenance(key: string, principal: Principal): Promise<void> {
    if (principal.role !== 'admin') {
      throw new PermissionDenied(`only an administrator can break the maintenance lock on ${key}`, { ref: key });
    }
    await this.shared?.removeMaintenance(key);
    this.remove((h) => h.key === key && h.mode === 'maintenance');
  }

  /**
   * Check without taking: throws the Busy acquire would throw for `principal` — a holder it can
   * neither preempt nor wait for (short operations end by themselves: acquire waits for them).
   */
  async check(requests: LockRequest[], principal: Principal): Promise<void> {
    const conflicts = this.conflicts(requests, { id: '', principal, description: '' }, await this.outside(requests.map((r) => r.key)));
    const blocking = conflicts.filter((c) => !this.canPreempt(principal, c) && holderKind(c.holder.id).kind !== 'operation');
    if (blocking.length > 0) throw busyError(blocking.find((c) => holderKind(c.holder.id).kind === 'job') ?? blocking[0]!);
  }

  private conflicts(requests: LockRequest[], holder: LockHolder, outside: Held[]): Held[] {
    const out: Held[] = [];
    const all = [...this.held, ...outside];
    for (const r of requests) {
      for (const h of all) {
        if (h.key !== r.key || h.holder.id === holder.id || isWithin(holder, h.holder.id) || isWithin(h.holder, holder.id)) continue;
        if (h.mode === 'maintenance') {
          if (holder.principal.role !== 'admin') out.push(h);
          continue;
        }
        if (lockModesConflict(h.mode, r.mode)) out.push(h);
      }
    }
    return out;
  }

  private canPreempt(requester: Principal, held: Held): boolean {
    return requester.role === 'admin' && held.mode !== 'maintenance' && held.holder.principal.role === 'tenant';
  }

  private grant(entries: Held[]): LockLease {
    this.held.push(...entries);
    let released = false;
    return {
      release: () => {
        if (released) return;
        released = true;
        this.remove((h) => entries.includes(h));
      },
    };
  }

  private remove(pred: (h: Held) => boolean): void {
    for (let i = this.held.length - 1; i >= 0; i--) if (pred(this.held[i]!)) this.held.splice(i, 1);
    for (const w of [...this.waiters]) w();
  }

  /** Until a lock of this manager is released, or `ms` (at most 250 ms) pass: another broker's release is seen by polling. */
  private waitForChange(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.waiters.delete(done);
        resolve();
      };
      const timer = setTimeout(done, Math.min(ms, 250));
      this.waiters.add(done);
    });
  }
}

/** What holds a lock, for messages: a job, a short operation (`op-…`) or an export (`export:NAME`). */
export function holderKind(id: string): { kind: 'job' | 'operation' | 'export'; name: string } {
  if (id.startsWith('export:')) {
    const rest = id.slice('export:'.length);
    const tag = rest.lastIndexOf('#'); // `export:NAME#TAG`: the tag keeps two processes' exports of one name apart
    return { kind: 'export', name: tag >= 0 ? rest.slice(0, tag) : rest };
  }
  return { kind: id.startsWith('op-') ? 'operation' : 'job', name: id };
}

/** What to do about a holder, for hints. */
export function holderHint(id: string): string {
  const h = holderKind(id);
  return h.kind === 'export' ? `stop export ${h.name} (\`offload nbd stop ${h.name}\`, or end its \`offload nbd\`)` : `wait for ${h.kind} ${h.name} or cancel it`;
}

function busyError(h: Held, extra?: string): Busy {
  const who = holderKind(h.holder.id);
  const by = h.mode === 'maintenance'
    ? `it is under maintenance by ${h.holder.principal.id} (${h.holder.description})`
    : `${who.kind} ${who.name} (${h.holder.description}, ${h.holder.principal.id}) holds ${h.mode === 'exclusive' ? 'an' : 'a'} ${h.mode} lock on it`;
  return new Busy(`${h.key} is busy: ${by}${extra ? `; ${extra}` : ''}`, {
    ref: h.key,
    hint: h.mode === 'maintenance' ? 'wait until an administrator lifts the maintenance lock' : holderHint(h.holder.id),
    data: { holder: h.holder.id, mode: h.mode, principal: h.holder.principal.id },
  });
}
