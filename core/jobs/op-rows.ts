/**
 * The rows one broker keeps in the state store for its operations (claims: op_locks) and exports:
 * written with their leases, renewed by the broker's heartbeat, removed when done — and removed
 * again at the next heartbeat when a removal failed (the database away a moment), since the
 * renewed lease would otherwise keep them holding their keys against the other brokers for as
 * long as the broker runs. A claim made again under an id waits for the removal of its earlier
 * rows, so that a late removal never takes the new ones.
 */
import type { LockHolder, LockMode, LockRequest, Outside } from '../locks/lock-manager.js';
import type { Principal } from '../locks/principal.js';
import { keysToRead, snapshotPrefixes, wholeVolumes, withWholeVolumes } from '../locks/whole-volume.js';
import { BackendUnavailable } from '../model/errors.js';
import type { ExportRecord, JobRecord, OpLockRecord } from '../state/records.js';
import type { StateStore } from '../state/state-store.js';
import type { Claimed } from './op-claims.js';

/** Other live brokers' locks among records read from the store (the job manager judges jobs and runners). */
export type ForeignOf = (jobs: JobRecord[], ops: OpLockRecord[]) => { key: string; mode: LockMode; holder: LockHolder }[];

export class OpRows {
  /** Operations and exports recorded and not removed yet: while there are, their leases are renewed. */
  private count = 0;
  /** Removals in flight (close waits for them). */
  private readonly withdrawing = new Set<Promise<void>>();
  /** Operations whose rows a removal failed to remove: tried again at each heartbeat. */
  private readonly leftRows = new Set<string>();
  /** Removals in flight, by id: a claim made again under one of those ids waits for them. */
  private readonly removing = new Map<string, Promise<void>>();
  private closing = false;
  /** The operations that listen for other processes' requests (exports), by id: polled together, one step of the store. */
  private readonly listeners = new Map<string, Listener>();
  private poller: NodeJS.Timeout | undefined;
  private polling = false;

  constructor(
    private readonly store: StateStore,
    private readonly token: string,
    /** This broker's host as its runners record it (runnerHost). */
    private readonly host: string,
    private readonly leaseMs: number,
    private readonly foreignOf: ForeignOf,
    /** Called before the first row naming this runner's token is written (its runner lock). */
    private readonly beforeFirstRow: () => void = () => undefined,
  ) {}

  /** The broker's heartbeat: the rows tell brokers on other hosts that this one still holds them; failed removals are tried again. */
  heartbeat(until: number): void {
    if (this.count > 0) this.store.renewOps(this.token, until).catch(() => undefined);
    if (this.leftRows.size > 0) void this.removeOpRows([...this.leftRows]);
  }

  /** Wait for the removals in flight (the broker is closing: rows left die with it, as dead runners' are ignored). */
  async close(): Promise<void> {
    this.closing = true;
    if (this.poller) clearInterval(this.poller);
    await Promise.allSettled([...this.withdrawing]);
  }

  /** Claims' rows (OpClaims' lapsed claims), removed in one statement. */
  withdrawMany(ids: string[]): Promise<void> {
    this.count -= ids.length;
    return this.removeOpRows(ids);
  }

  /** Remove operations' rows; those a failure leaves are tried again at the next heartbeat (a closed store: they die with this process). */
  private removeOpRows(ids: string[]): Promise<void> {
    for (const id of ids) this.leftRows.delete(id);
    const done = this.store.deleteOpLocks(ids).catch(() => {
      if (!this.closing) for (const id of ids) this.leftRows.add(id);
    });
    for (const id of ids) this.removing.set(id, done);
    this.withdrawing.add(done);
    void done.then(() => {
      this.withdrawing.delete(done);
      for (const id of ids) if (this.removing.get(id) === done) this.removing.delete(id);
    });
    return done;
  }

  /**
   * Write an operation's locks as its rows and read what other brokers hold, in one step of the
   * store (StateOps.claimOpLocks). `onStopRequest`: another process may ask it to stop (an
   * export); `onCall`: to make a call on its behalf (StateOps.requestOpCall), answered with its result. `covering`: a short operation's claim, read so that it may cover its volumes'
   * snapshots (whole-volume.ts).
   */
  async claim(id: string, locks: LockRequest[], principal: Principal, description: string, onStopRequest?: () => void, covering = false,
    onCall?: (call: string) => Promise<string>): Promise<Claimed & { withdraw: () => Promise<void>; recheck?: () => Promise<Outside>; seq?: number }> {
    this.beforeFirstRow();
    const row = {
      id, locks, principal: principal.id, role: principal.role, description,
      runnerPid: process.pid, runnerToken: this.token, runnerHost: this.host, leaseExpires: Date.now() + this.leaseMs,
    };
    // Claimed again under an id (a request that waited and publishes anew) whose earlier rows are
    // being removed, or could not be: those go first. A removal that overtook the new rows would
    // take them too, and the claim's place in line is its new rows'.
    const removing = this.removing.get(id);
    if (removing) await removing;
    if (this.leftRows.has(id)) {
      await this.removeOpRows([id]);
      if (this.leftRows.has(id)) throw new BackendUnavailable(`the state store did not remove the earlier locks of ${id}`, { ref: id, hint: 'try again once the state store answers' });
    }
    this.count++;
    let holders;
    try {
      holders = await this.store.claimOpLocks(row, { keys: keysToRead(locks.map((l) => l.key)), prefixes: covering ? snapshotPrefixes(locks) : [] });
    } catch (e) {
      this.count--;
      // Not knowing whether the row was written: remove it if it was (tried again if that fails too).
      await this.removeOpRows([id]);
      throw e;
    }
    if (onStopRequest || onCall) this.listen(id, { ...(onStopRequest ? { onStopRequest } : {}), ...(onCall ? { onCall } : {}) });
    let done: Promise<void> | undefined;
    const withdraw = () => {
      done ??= (async () => {
        this.unlisten(id);
        this.count--;
        await this.removeOpRows([id]);
      })();
      return done;
    };
    // Its place in the order of claims: a recheck leaves out the operations claimed after it (Publish).
    const seq = holders.ops.find((o) => o.id === id)?.seq;
    const keys = [...new Set(locks.map((l) => l.key))];
    const recheck = seq === undefined ? undefined : async (): Promise<Outside> => {
      const now = await this.store.lockHolders(keysToRead(keys));
      const before = now.ops.filter((o) => o.seq === undefined || o.seq < seq);
      return { foreign: withWholeVolumes(this.foreignOf(now.jobs, before), keys), maintenance: now.maintenance.map(maintenanceLock) };
    };
    // What it read of its volumes' snapshots decides what it covers; the rest is judged by key.
    const all = { foreign: this.foreignOf(holders.jobs, holders.ops), maintenance: holders.maintenance.map(maintenanceLock) };
    const requested = new Set(keys);
    return {
      id, owners: holders.owners, withdraw,
      outside: { foreign: withWholeVolumes(all.foreign, keys).filter((f) => requested.has(f.key)), maintenance: all.maintenance.filter((m) => requested.has(m.key)) },
      ...(covering ? { wholeVolumes: wholeVolumes(locks, all) } : {}),
      ...(recheck ? { recheck, seq } : {}),
    };
  }

  private listen(id: string, l: Listener): void {
    this.listeners.set(id, l);
    if (this.poller || this.closing) return;
    this.poller = setInterval(() => this.poll(), POLL_MS);
    this.poller.unref();
  }

  private unlisten(id: string): void {
    this.listeners.delete(id);
    if (this.listeners.size > 0 || !this.poller) return;
    clearInterval(this.poller);
    this.poller = undefined;
  }

  /** One step of the store for every listening operation: stop requests acted on, calls answered (each as it ends, while the polling goes on: a snapshot waits for the export's writes in flight). */
  private poll(): void {
    if (this.polling || this.listeners.size === 0) return;
    this.polling = true;
    // Those listening when it was asked: a call taken for one withdrawn meanwhile is still answered.
    const asked = new Map(this.listeners);
    this.store.takeOpRequests([...asked.keys()]).then(({ stops, calls }) => {
      for (const id of stops) asked.get(id)?.onStopRequest?.();
      for (const c of calls) {
        const onCall = asked.get(c.opId)?.onCall;
        if (onCall) void onCall(c.call).then((a) => this.store.answerOpCall(c.id, a)).catch(() => undefined);
      }
    }).catch(() => undefined).finally(() => { this.polling = false; });
  }

  /** Record an export (`offload nbd list`, `nbd stop` elsewhere): its lease is renewed with the claims'. Returns the removal. */
  async recordExport(e: Omit<ExportRecord, 'runnerPid' | 'runnerToken' | 'runnerHost' | 'leaseExpires'>): Promise<() => Promise<void>> {
    this.beforeFirstRow();
    await this.store.insertExport({ ...e, runnerPid: process.pid, runnerToken: this.token, runnerHost: this.host, leaseExpires: Date.now() + this.leaseMs });
    this.count++;
    let done: Promise<void> | undefined;
    return () => {
      done ??= (async () => {
        this.count--;
        await this.store.deleteExport(e.id).catch(() => undefined);
      })();
      return done;
    };
  }
}

/** How often a process looks for what others ask of its exports. */
const POLL_MS = 250;

/** What an operation listens for: another process asking it to stop, or to make a call (op-calls.ts). */
interface Listener {
  onStopRequest?: () => void;
  onCall?: (call: string) => Promise<string>;
}

/** A maintenance lock as the store keeps it, as the lock manager sees it: placed by an administrator. */
export function maintenanceLock(m: { key: string; principal: string; reason: string }): Outside['maintenance'][number] {
  return { key: m.key, reason: m.reason, principal: { id: m.principal, role: 'admin' } };
}
