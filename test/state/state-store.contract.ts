/**
 * The StateStore contract (core/state/state-store.ts), one suite for every implementation. `a` and
 * `b` are two stores on the same database, as two brokers would be: what one writes the other
 * reads, and their races have one winner. The stores are opened once per suite; every case uses
 * ids of its own.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Busy, isOffloadError } from '../../core/model/errors.js';
import { RELEASED, type ExportRecord, type JobRecord, type OpLockRecord } from '../../core/state/records.js';
import type { StateOps, StateStore } from '../../core/state/state-store.js';

export interface OpenStores {
  a: StateStore;
  b: StateStore;
  /** Another store on the same database (opened now: creates or migrates nothing new). */
  another(): Promise<StateStore>;
  /** The database's schema version, and a way to set it (as a newer build would have). */
  schemaVersion(): Promise<number>;
  setSchemaVersion(version: number): Promise<void>;
  close(): Promise<void>;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

let unique = 0;
/** A fresh id prefix for one case. */
const prefix = (what: string) => `${what}-${Date.now().toString(36)}-${++unique}`;

/** Epoch ms and sizes past 2^31 (and 2^40): a BIGINT read back as a string or an int32 would show. */
const LEASE = 1_767_225_600_123;
const BIG = 2 ** 40 + 3;

function job(id: string, over: Partial<JobRecord> = {}): JobRecord {
  return {
    id, type: 'copy', status: 'running', executor: 'host', ref: 'pool/vol', owner: 'alice',
    progress: { current: 5, total: 10 }, speed: 0, cancelled: false,
    createdAt: '2026-01-01T00:00:00.000Z', updatedAt: '2026-01-01T00:00:01.000Z', params: { from: 'a', to: 'b' },
    runnerPid: 4242, runnerToken: 'tok-a', runnerHost: 'host-a', leaseExpires: LEASE, seenAt: LEASE - 15_000, fence: 4,
    locks: [{ key: 'vol:pool/vol', mode: 'exclusive' }], ownerRole: 'admin',
    ...over,
  };
}

/** Operations as written: without the seq a store reads back with them (compared apart). */
function bare(ops: OpLockRecord[]): OpLockRecord[] {
  return ops.map(({ seq: _seq, ...rest }) => rest);
}

function opLocks(id: string, keys: string[], over: Partial<OpLockRecord> = {}): OpLockRecord {
  return {
    id, locks: keys.map((key, i) => ({ key, mode: i % 2 ? 'shared' : 'exclusive' })), principal: 'alice', role: 'tenant',
    description: `create ${keys.join(',')}`, runnerPid: 77, runnerToken: 'tok-op', runnerHost: 'host-op', leaseExpires: LEASE, ...over,
  };
}

/** Whether a stop request for `id` was there, taken (StateOps.takeOpRequests, as a process polls for one export). */
const stopTaken = async (s: StateStore, id: string) => (await s.takeOpRequests([id])).stops.includes(id);
/** The calls to `opId` not taken yet, taken. */
const callsOf = async (s: StateStore, opId: string) => (await s.takeOpRequests([opId])).calls;

function exportRec(id: string, name: string, over: Partial<ExportRecord> = {}): ExportRecord {
  return {
    id, name, ref: `pool/${name}`, uri: `nbd+unix:///${name}?socket=/run/x.sock`, readOnly: true, owner: 'bob', role: 'tenant',
    runnerPid: 55, runnerToken: 'tok-x', runnerHost: 'host-x', leaseExpires: LEASE, startedAt: '2026-01-01T00:00:00.000Z', ...over,
  };
}

export function describeStateStore(kind: string, open: () => Promise<OpenStores>): void {
  describe(`StateStore contract (${kind})`, () => {
    let s: OpenStores;
    let a: StateStore;
    let b: StateStore;

    beforeAll(async () => {
      s = await open();
      ({ a, b } = s);
    });
    afterAll(async () => {
      await s?.close();
    });

    describe('jobs', () => {
      it('lists only the jobs not concluded when asked for active ones, oldest first', async () => {
        const p = prefix('active');
        await a.insertJob(job(`${p}-1`, { createdAt: '2026-03-01T00:00:00.000Z' }));
        await a.insertJob(job(`${p}-2`, { status: 'concluded', createdAt: '2026-03-02T00:00:00.000Z' }));
        await b.insertJob(job(`${p}-3`, { status: 'paused', createdAt: '2026-03-03T00:00:00.000Z' }));
        const ids = async (filter?: { active?: boolean }) => (await b.listJobs(filter)).map((j) => j.id).filter((id) => id.startsWith(p));
        expect(await ids({ active: true })).toEqual([`${p}-1`, `${p}-3`]);
        expect(await ids()).toEqual([`${p}-1`, `${p}-2`, `${p}-3`]);
        for (const i of [1, 2, 3]) await a.deleteJob(`${p}-${i}`);
      });

      it('round-trips every field of a record, and leaves absent optional fields absent', async () => {
        const p = prefix('rt');
        const full = job(`${p}-full`, {
          type: 'live-copy', status: 'paused', executor: 'backend:array1', backend: 'array1', ref: 'array1/pool/vm-disk', owner: 'tenant-7',
          progress: { current: BIG - 1, total: BIG }, speed: 3_000_000_000, cancelled: true,
          error: { code: 'BackendUnavailable', message: 'the array did not answer' },
          plan: { steps: [{ op: 'copy', bytes: BIG }], note: 'ünïcode ✓' }, params: { nested: { list: [1, 'two', null, true] }, n: 1.5 },
          checkpoint: { offset: BIG - 7, bitmap: 'AAEC' }, request: { verb: 'set-speed', speed: 1_000_000 },
          locks: [{ key: 'vol:array1/pool/vm-disk', mode: 'exclusive' }, { key: 'pool:array1/pool', mode: 'shared' }],
          ownerRole: 'tenant', runnerPid: 31337, runnerToken: 'tok-full', runnerHost: 'host-full.example', leaseExpires: LEASE + 1, seenAt: LEASE - 2, fence: 2 ** 33,
        });
        const bare = job(`${p}-bare`);
        const nullish = job(`${p}-null`, { checkpoint: null, plan: 0 });
        for (const j of [full, bare, nullish]) await a.insertJob(j);
        expect(await b.getJob(full.id)).toStrictEqual(full);
        expect(await b.getJob(bare.id)).toStrictEqual(bare);
        expect(await b.getJob(nullish.id)).toStrictEqual(nullish);
        expect(await a.getJob(`${p}-none`)).toBeUndefined();
      });

      it('lists jobs oldest first (created_at, then id), deletes, and refuses a taken id (AlreadyExists)', async () => {
        const p = prefix('list');
        const jobs = [
          job(`${p}-c`, { createdAt: '2030-01-01T00:00:02.000Z' }),
          job(`${p}-b`, { createdAt: '2030-01-01T00:00:01.000Z' }),
          job(`${p}-a`, { createdAt: '2030-01-01T00:00:02.000Z' }),
          job(`${p}-B`, { createdAt: '2030-01-01T00:00:01.000Z' }),
          job(`${p}-_`, { createdAt: '2029-12-31T23:59:59.999Z' }),
        ];
        for (const [i, j] of jobs.entries()) await (i % 2 ? a : b).insertJob(j);
        const mine = (list: JobRecord[]) => list.filter((j) => j.id.startsWith(p)).map((j) => j.id);
        expect(mine(await a.listJobs())).toEqual([`${p}-_`, `${p}-B`, `${p}-b`, `${p}-a`, `${p}-c`]);
        expect(mine(await b.listJobs())).toEqual(mine(await a.listJobs()));

        await expect(b.insertJob(job(`${p}-a`, { owner: 'mallory' }))).rejects.toMatchObject({ code: 'AlreadyExists' });
        await expect(a.insertJob(job(`${p}-a`, { owner: 'mallory' }))).rejects.toMatchObject({ code: 'AlreadyExists' });
        expect((await a.getJob(`${p}-a`))!.owner).toBe('alice');

        await a.deleteJob(`${p}-b`);
        await a.deleteJob(`${p}-missing`); // nothing to delete: no error
        expect(await b.getJob(`${p}-b`)).toBeUndefined();
        expect(mine(await b.listJobs())).toEqual([`${p}-_`, `${p}-B`, `${p}-a`, `${p}-c`]);
      });

      it('lists the jobs of one type, and those of it not concluded', async () => {
        const p = prefix('type');
        await a.insertJob(job(`${p}-m1`, { type: 'mirror', status: 'concluded', createdAt: '2030-02-01T00:00:01.000Z' }));
        await b.insertJob(job(`${p}-c1`, { type: 'copy', createdAt: '2030-02-01T00:00:02.000Z' }));
        await a.insertJob(job(`${p}-m2`, { type: 'mirror', createdAt: '2030-02-01T00:00:03.000Z' }));
        const mine = (list: JobRecord[]) => list.filter((j) => j.id.startsWith(p)).map((j) => j.id);
        expect(mine(await b.listJobs({ type: 'mirror' }))).toEqual([`${p}-m1`, `${p}-m2`]);
        expect(mine(await b.listJobs({ type: 'mirror', active: true }))).toEqual([`${p}-m2`]);
        expect(mine(await a.listJobs({ type: 'copy' }))).toEqual([`${p}-c1`]);
        expect(mine(await a.listJobs({ type: "none' OR '1'='1" }))).toEqual([]);
      });
    });

    describe('fencing', () => {
      it('a runner taken over writes nothing more; the new one writes; a released job goes to the next taker', async () => {
        const id = prefix('fence');
        await a.insertJob(job(id, { runnerToken: 'tok-a', fence: 4 }));
        const before = Date.now();
        expect(await b.claimJob(id, { token: 'tok-a', fence: 4, leaseExpires: LEASE }, { pid: 2, token: 'tok-b', host: 'host-b' }, LEASE + 100)).toBe(5);
        const taken = (await a.getJob(id))!;
        expect(taken).toMatchObject({ runnerPid: 2, runnerToken: 'tok-b', runnerHost: 'host-b', fence: 5, leaseExpires: LEASE + 100 });
        expect(taken.seenAt).toBeGreaterThanOrEqual(before);
        expect(taken.seenAt).toBeLessThanOrEqual(Date.now());

        // The old runner: token and fence stale, and either one stale alone, are all refused.
        const old = job(id, { runnerToken: 'tok-a', fence: 4, status: 'concluded', progress: { current: 10, total: 10 }, checkpoint: { stale: true } });
        expect(await a.updateJob(old)).toBe(false);
        expect(await a.updateJob({ ...old, fence: 5 })).toBe(false);
        expect(await a.updateJob({ ...old, runnerToken: 'tok-b' })).toBe(false);
        expect(await a.renewLease(id, 'tok-a', 4, LEASE + 999)).toBe(false);
        expect(await a.renewLease(id, 'tok-b', 4, LEASE + 999)).toBe(false);
        expect(await a.releaseJob(id, 'tok-a', 4, { stale: true })).toBe(false);
        expect(await a.releaseJob(id, 'tok-a', 5, { stale: true })).toBe(false);
        expect(await a.claimJob(id, { token: 'tok-a', fence: 4, leaseExpires: LEASE }, { pid: 3, token: 'tok-c', host: 'host-c' }, LEASE)).toBeUndefined();
        expect(await b.getJob(id)).toStrictEqual(taken);

        // The new runner writes the live fields only: a pending request, the plan, params, locks and fence stay.
        await a.setRequest(id, { verb: 'pause' });
        const live = {
          ...taken, status: 'paused' as const, progress: { current: 7, total: BIG }, speed: 100, error: { code: 'Timeout' as const, message: 'slow' },
          cancelled: true, checkpoint: { at: 7 }, runnerPid: 22, runnerHost: 'host-b2', leaseExpires: LEASE + 200, updatedAt: '2026-01-02T00:00:00.000Z',
        };
        expect(await b.updateJob({ ...live, plan: 'other', params: { other: 1 }, locks: [], ownerRole: 'tenant', request: undefined, seenAt: 1 })).toBe(true);
        expect(await a.getJob(id)).toStrictEqual({ ...live, request: { verb: 'pause' } });

        const renewed = Date.now();
        expect(await b.renewLease(id, 'tok-b', 5, LEASE + 300)).toBe(true);
        const r = (await a.getJob(id))!;
        expect(r.leaseExpires).toBe(LEASE + 300);
        expect(r.seenAt).toBeGreaterThanOrEqual(renewed);

        expect(await b.releaseJob(id, 'tok-b', 5, { at: 9 })).toBe(true);
        expect(await a.getJob(id)).toMatchObject({ runnerToken: RELEASED, runnerPid: 0, leaseExpires: 0, checkpoint: { at: 9 }, fence: 5 });
        expect(await b.updateJob(live)).toBe(false);
        expect(await b.renewLease(id, 'tok-b', 5, LEASE)).toBe(false);

        expect(await a.claimJob(id, { token: RELEASED, fence: 5, leaseExpires: 0 }, { pid: 9, token: 'tok-a2', host: 'host-a' }, LEASE + 400)).toBe(6);
        expect(await b.getJob(id)).toMatchObject({ runnerToken: 'tok-a2', runnerPid: 9, fence: 6, checkpoint: { at: 9 } });
      });

      it('a claim from a stale view misses: the runner renewed its lease since, or the job concluded', async () => {
        const id = prefix('stale');
        await a.insertJob(job(id));
        expect(await a.renewLease(id, 'tok-a', 4, LEASE + 50)).toBe(true);
        expect(await b.claimJob(id, { token: 'tok-a', fence: 4, leaseExpires: LEASE }, { pid: 2, token: 'tok-b', host: 'host-b' }, LEASE + 100)).toBeUndefined();
        expect(await a.updateJob(job(id, { leaseExpires: LEASE + 50, status: 'concluded' }))).toBe(true);
        expect(await b.claimJob(id, { token: 'tok-a', fence: 4, leaseExpires: LEASE + 50 }, { pid: 2, token: 'tok-b', host: 'host-b' }, LEASE + 100)).toBeUndefined();
        expect(await a.getJob(id)).toMatchObject({ runnerToken: 'tok-a', fence: 4, status: 'concluded' });
      });

      it('a deleted job can be neither written, renewed, released nor claimed', async () => {
        const id = prefix('gone');
        await a.insertJob(job(id));
        await b.deleteJob(id);
        expect(await a.updateJob(job(id))).toBe(false);
        expect(await a.renewLease(id, 'tok-a', 4, LEASE)).toBe(false);
        expect(await a.releaseJob(id, 'tok-a', 4, undefined)).toBe(false);
        expect(await a.claimJob(id, { token: 'tok-a', fence: 4, leaseExpires: LEASE }, { pid: 1, token: 't', host: 'h' }, LEASE)).toBeUndefined();
        expect(await a.getJob(id)).toBeUndefined();
      });

      it('replaceCheckpoint swaps the checkpoint only while it is the one expected, whoever runs the job, and touches nothing else', async () => {
        const id = prefix('cas');
        const intent = { authoritative: 'source', intent: [{ sizeBytes: BIG, regionBytes: 1 << 20, bits: 'AQ==' }] };
        await a.insertJob(job(id, { status: 'concluded', checkpoint: intent }));
        expect(await b.replaceCheckpoint(id, { authoritative: 'source' }, { x: 1 })).toBe(false);
        expect(await b.replaceCheckpoint(id, intent, { authoritative: 'source' })).toBe(true);
        expect(await a.getJob(id)).toMatchObject({ checkpoint: { authoritative: 'source' }, status: 'concluded', runnerToken: 'tok-a', fence: 4, progress: { current: 5, total: 10 } });
        expect(await a.replaceCheckpoint(id, intent, { again: true })).toBe(false); // changed since: nothing written
        // Of two racing swaps from the same view, one wins.
        const wins = await Promise.all([a.replaceCheckpoint(id, { authoritative: 'source' }, { by: 'a' }), b.replaceCheckpoint(id, { authoritative: 'source' }, { by: 'b' })]);
        expect(wins.filter(Boolean)).toHaveLength(1);
        const none = prefix('cas-none');
        await a.insertJob(job(none));
        expect(await b.replaceCheckpoint(none, undefined, { first: 1 })).toBe(true);
        expect((await a.getJob(none))?.checkpoint).toEqual({ first: 1 });
        expect(await b.replaceCheckpoint(prefix('missing'), undefined, {})).toBe(false);
      });

      it('of 20 racing takers (both stores, same `from`) exactly one wins, and the record names it', async () => {
        for (let round = 0; round < 5; round++) {
          const id = prefix('race');
          await a.insertJob(job(id, { runnerToken: 'dead', fence: 7 }));
          const results = await Promise.all(Array.from({ length: 20 }, (_, i) =>
            (i % 2 ? a : b).claimJob(id, { token: 'dead', fence: 7, leaseExpires: LEASE }, { pid: 100 + i, token: `r${i}`, host: `host-${i % 2}` }, LEASE + i)));
          const winners = results.flatMap((f, i) => (f === undefined ? [] : [i]));
          expect(winners, `round ${round}: ${JSON.stringify(results)}`).toHaveLength(1);
          const w = winners[0]!;
          expect(results[w]).toBe(8);
          expect(results.filter((f) => f === undefined)).toHaveLength(19);
          expect(await b.getJob(id)).toMatchObject({ runnerToken: `r${w}`, runnerPid: 100 + w, runnerHost: `host-${w % 2}`, leaseExpires: LEASE + w, fence: 8 });
        }
      });
    });

    describe('transactions', () => {
      it('serialize a check-then-insert: two stores racing for one lock never both get it', async () => {
        const p = prefix('lockrace');
        for (let round = 0; round < 15; round++) {
          const key = `vol:${p}/${round}`;
          const take = (store: StateStore, me: string) => store.transaction('locks', async (tx) => {
            const held = await tx.listOpLocks();
            const conflict = held.find((op) => op.locks.some((l) => l.key === key));
            if (conflict) throw new Busy(`${key} is locked by ${conflict.id}`);
            await sleep(5); // the window in which an unserialized other would check too
            await tx.insertOpLocks(opLocks(`${p}-${round}-${me}`, [key]));
            return me;
          });
          const results = await Promise.allSettled([take(a, 'a'), take(b, 'b')]);
          const won = results.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
          expect(won, `round ${round}`).toHaveLength(1);
          const lost = results.find((r) => r.status === 'rejected');
          expect(isOffloadError(lost?.reason, 'Busy'), `round ${round}: ${String(lost?.reason)}`).toBe(true);
          const holders = (await a.listOpLocks()).filter((op) => op.locks.some((l) => l.key === key));
          expect(holders.map((op) => op.id)).toEqual([`${p}-${round}-${won[0]}`]);
        }
      });

      it('claimOpLocks: of two claims at once, and of a claim and a check-then-insert, the later always sees the earlier', async () => {
        const p = prefix('claimrace');
        const sees = (holders: { ops: OpLockRecord[] }, id: string) => holders.ops.some((o) => o.id === id);
        for (let round = 0; round < 15; round++) {
          const key = `vol:${p}/${round}`;
          const [x, y] = await Promise.all([a.claimOpLocks(opLocks(`${p}-${round}-a`, [key])), b.claimOpLocks(opLocks(`${p}-${round}-b`, [key]))]);
          // Each sees its own claim, and at least one sees the other's: they cannot both find the way clear.
          expect(sees(x, `${p}-${round}-a`) && sees(y, `${p}-${round}-b`), `round ${round}`).toBe(true);
          expect(sees(x, `${p}-${round}-b`) || sees(y, `${p}-${round}-a`), `round ${round}`).toBe(true);
          // A transaction that checks, waits, then inserts, against a claim made while it waits.
          const tkey = `vol:${p}/t${round}`;
          let checked!: () => void;
          const inWindow = new Promise<void>((r) => { checked = r; });
          const txSaw = a.transaction('locks', async (tx) => {
            const saw = (await tx.listOpLocks()).some((o) => o.id === `${p}-${round}-claim`);
            checked();
            await sleep(5); // the window in which an unserialized claim would insert and read
            await tx.insertOpLocks(opLocks(`${p}-${round}-tx`, [tkey]));
            return saw;
          });
          await inWindow;
          const claim = await b.claimOpLocks(opLocks(`${p}-${round}-claim`, [tkey]));
          expect((await txSaw) || sees(claim, `${p}-${round}-tx`), `round ${round}: neither saw the other`).toBe(true);
        }
        for (const op of (await a.listOpLocks()).filter((o) => o.id.startsWith(p))) await a.deleteOpLocks(op.id);
      });

      it('commit what fn wrote and return its value; roll everything back when fn throws', async () => {
        const p = prefix('tx');
        const out = await a.transaction('locks', async (tx) => {
          await tx.insertJob(job(`${p}-kept`));
          await tx.setOwner(`${p}/vol`, 'alice');
          expect(await tx.getJob(`${p}-kept`)).toBeDefined(); // its own writes, before commit
          return 42;
        });
        expect(out).toBe(42);
        expect(await b.getJob(`${p}-kept`)).toBeDefined();
        expect(await b.getOwner(`${p}/vol`)).toBe('alice');
        expect(await b.getOwners([`${p}/vol`, `${p}/none`])).toStrictEqual({ [`${p}/vol`]: 'alice' });
        expect(await b.getOwners([])).toStrictEqual({});

        const boom = new Error('boom');
        await expect(b.transaction('locks', async (tx) => {
          await tx.insertJob(job(`${p}-undone`));
          await tx.insertOpLocks(opLocks(`${p}-op`, [`vol:${p}`]));
          await tx.setOwner(`${p}/vol`, 'mallory');
          await tx.deleteJob(`${p}-kept`);
          await tx.placeMaintenance(`${p}-m`, 'admin', 'upgrade');
          throw boom;
        })).rejects.toBe(boom);
        for (const store of [a, b]) {
          expect(await store.getJob(`${p}-undone`)).toBeUndefined();
          expect(await store.getJob(`${p}-kept`)).toBeDefined();
          expect(await store.getOwner(`${p}/vol`)).toBe('alice');
          expect((await store.listOpLocks()).filter((op) => op.id.startsWith(p))).toEqual([]);
          expect((await store.listMaintenance()).filter((m) => m.key.startsWith(p))).toEqual([]);
        }
        // A failed transaction leaves the store usable, and the lock free.
        expect(await a.transaction('locks', async (tx) => (await tx.getJob(`${p}-kept`))?.id)).toBe(`${p}-kept`);
      });

      it('a tx used after its transaction ended rejects (FailedPrecondition) and writes nothing', async () => {
        const p = prefix('stale');
        let kept: StateOps | undefined;
        await a.transaction('locks', async (tx) => {
          kept = tx;
        });
        await expect(kept!.getJob(`${p}-x`)).rejects.toMatchObject({ code: 'FailedPrecondition' });
        await expect(kept!.insertJob(job(`${p}-x`))).rejects.toMatchObject({ code: 'FailedPrecondition' });
        let failed: StateOps | undefined;
        await expect(b.transaction('locks', async (tx) => {
          failed = tx;
          throw new Error('out');
        })).rejects.toThrow('out');
        await expect(failed!.setOwner(`${p}/vol`, 'x')).rejects.toMatchObject({ code: 'FailedPrecondition' });
        expect(await a.getJob(`${p}-x`)).toBeUndefined();
        expect(await b.getOwner(`${p}/vol`)).toBeUndefined();
      });
    });

    describe('requests', () => {
      it('a pending cancel is never replaced; other verbs replace each other; set-speed carries its speed', async () => {
        const id = prefix('req');
        await a.insertJob(job(id));
        await b.setRequest(id, { verb: 'pause' });
        expect((await a.getJob(id))!.request).toEqual({ verb: 'pause' });
        await a.setRequest(id, { verb: 'set-speed', speed: 12_345_678_901 });
        expect(await b.takeRequest(id)).toEqual({ verb: 'set-speed', speed: 12_345_678_901 });
        expect(await b.takeRequest(id)).toBeUndefined();

        await a.setRequest(id, { verb: 'pause' });
        await b.setRequest(id, { verb: 'cancel' }); // cancel replaces anything
        for (const verb of ['pause', 'resume', 'complete'] as const) await (verb === 'resume' ? a : b).setRequest(id, { verb });
        await a.setRequest(id, { verb: 'set-speed', speed: 1 });
        expect((await b.getJob(id))!.request).toEqual({ verb: 'cancel' });
        expect(await a.takeRequest(id)).toEqual({ verb: 'cancel' });
        expect(await a.takeRequest(id)).toBeUndefined();
        expect((await b.getJob(id))!.request).toBeUndefined();
        await a.setRequest(`${id}-missing`, { verb: 'cancel' }); // no such job: nothing to do
        expect(await a.takeRequest(`${id}-missing`)).toBeUndefined();
      });

      it('a request is taken once, however many take it at once', async () => {
        const id = prefix('take');
        await a.insertJob(job(id));
        for (let round = 0; round < 3; round++) {
          await b.setRequest(id, { verb: 'cancel' });
          const got = await Promise.all(Array.from({ length: 10 }, (_, i) => (i % 2 ? a : b).takeRequest(id)));
          expect(got.filter((r) => r !== undefined)).toEqual([{ verb: 'cancel' }]);
        }
      });
    });

    describe('operations, exports, maintenance, owners', () => {
      it('op locks: one record per operation, its locks in order, modes kept; delete drops a stop request too', async () => {
        const p = prefix('ops');
        const one = opLocks(`${p}-1`, [`vol:${p}/x`, `pool:${p}`, `vol:${p}/y`]);
        const two = opLocks(`${p}-0`, [`vol:${p}/z`], { role: 'admin', principal: 'root', runnerPid: 1, runnerToken: 'tok-2', description: 'resize' });
        await a.insertOpLocks(one);
        await b.insertOpLocks(two);
        const mine = async (s: StateStore) => bare((await s.listOpLocks()).filter((op) => op.id.startsWith(p)));
        expect(await mine(a)).toStrictEqual([two, one]);
        expect(await mine(b)).toStrictEqual([two, one]);

        expect(await stopTaken(a, one.id)).toBe(false);
        await b.requestOpStop(one.id);
        await b.requestOpStop(one.id);
        expect(await stopTaken(a, one.id)).toBe(true);
        expect(await stopTaken(a, one.id)).toBe(false);

        await b.requestOpStop(one.id);
        const taken = await Promise.all(Array.from({ length: 10 }, (_, i) => stopTaken(i % 2 ? a : b, one.id)));
        expect(taken.filter(Boolean)).toHaveLength(1);

        await b.requestOpStop(one.id);
        await a.deleteOpLocks(one.id);
        expect(await mine(b)).toStrictEqual([two]);
        expect(await stopTaken(b, one.id)).toBe(false);
        await b.deleteOpLocks(two.id);
        expect(await mine(a)).toEqual([]);
      });

      it('op calls: taken once by the holder, answered, the answer read once; withdrawn only untaken; unanswered ones go with the op', async () => {
        const p = prefix('calls');
        const op = opLocks(`${p}-op`, [`vol:${p}/x`]);
        await a.insertOpLocks(op);
        expect(await callsOf(a, op.id)).toEqual([]);
        await b.requestOpCall(`${p}-c1`, op.id, '{"n":1}');
        await b.requestOpCall(`${p}-c2`, op.id, '{"n":2}');
        expect(await b.takeOpCallAnswer(`${p}-c1`)).toBeUndefined();
        // Two takers at once: each call to one of them.
        const [x, y] = await Promise.all([callsOf(a, op.id), callsOf(b, op.id)]);
        expect([...x!, ...y!].map((c) => c.call).sort()).toEqual(['{"n":1}', '{"n":2}']);
        expect(await callsOf(a, op.id)).toEqual([]);
        expect(await b.withdrawOpCall(`${p}-c1`)).toBe(false); // taken
        await a.answerOpCall(`${p}-c1`, '{"ok":true}');
        expect(await b.takeOpCallAnswer(`${p}-c1`)).toBe('{"ok":true}');
        expect(await b.takeOpCallAnswer(`${p}-c1`)).toBeNull();
        // Not taken yet: withdrawn, and the holder never sees it.
        await b.requestOpCall(`${p}-c3`, op.id, '{"n":3}');
        expect(await b.withdrawOpCall(`${p}-c3`)).toBe(true);
        expect(await callsOf(a, op.id)).toEqual([]);
        // The op ends: its calls not taken are gone (null); one taken is answered after, and read.
        expect(await b.requestOpCall(`${p}-c4`, op.id, '{"n":4}')).toBe(true);
        await a.deleteOpLocks(op.id);
        expect(await b.takeOpCallAnswer(`${p}-c4`)).toBeNull();
        await a.answerOpCall(`${p}-c2`, '{"ok":false}');
        expect(await b.takeOpCallAnswer(`${p}-c2`)).toBe('{"ok":false}');
        // An op that holds no locks (any more) takes no call.
        expect(await b.requestOpCall(`${p}-c5`, op.id, '{"n":5}')).toBe(false);
        expect(await b.takeOpCallAnswer(`${p}-c5`)).toBeNull();
        // A call answered whose asker never read it: swept once it is older than the sweep's bound, not before.
        const op2 = opLocks(`${p}-op2`, [`vol:${p}/y`]);
        await a.insertOpLocks(op2);
        expect(await b.requestOpCall(`${p}-c6`, op2.id, '{"n":6}')).toBe(true);
        await callsOf(a, op2.id);
        await a.answerOpCall(`${p}-c6`, '{"ok":true}');
        expect(await a.sweepOpCalls(new Date(Date.now() - 3_600_000).toISOString())).toBe(0);
        expect(await a.sweepOpCalls(new Date(Date.now() + 1000).toISOString())).toBeGreaterThanOrEqual(1);
        expect(await b.takeOpCallAnswer(`${p}-c6`)).toBeNull();
        await a.deleteOpLocks(op2.id);
      });

      it('op requests of several operations in one step: stops and calls of those named, each once; others left', async () => {
        const p = prefix('reqs');
        const ops = [1, 2, 3].map((i) => opLocks(`${p}-op${i}`, [`vol:${p}/v${i}`]));
        for (const op of ops) await a.insertOpLocks(op);
        expect(await a.takeOpRequests([])).toEqual({ stops: [], calls: [] });
        await b.requestOpStop(ops[0]!.id);
        await b.requestOpStop(ops[2]!.id);
        await b.requestOpCall(`${p}-c1`, ops[1]!.id, '{"n":1}');
        await sleep(2); // requested_at: the order calls are taken in
        await b.requestOpCall(`${p}-c2`, ops[0]!.id, '{"n":2}');
        await b.requestOpCall(`${p}-c3`, ops[2]!.id, '{"n":3}');
        expect(await a.takeOpRequests([ops[0]!.id, ops[1]!.id])).toEqual({
          stops: [ops[0]!.id],
          calls: [{ id: `${p}-c1`, opId: ops[1]!.id, call: '{"n":1}' }, { id: `${p}-c2`, opId: ops[0]!.id, call: '{"n":2}' }],
        });
        expect(await b.takeOpRequests([ops[0]!.id, ops[1]!.id])).toEqual({ stops: [], calls: [] });
        expect(await b.takeOpRequests([ops[2]!.id])).toEqual({ stops: [ops[2]!.id], calls: [{ id: `${p}-c3`, opId: ops[2]!.id, call: '{"n":3}' }] });
        await a.deleteOpLocks(ops.map((o) => o.id));
      });

      it('exports: insert, replace by id, list by name then id, delete', async () => {
        const p = prefix('exp');
        const web2 = exportRec(`export:${p}-web#2`, `${p}-web`);
        const web1 = exportRec(`export:${p}-web#1`, `${p}-web`, { readOnly: false, role: 'admin', owner: 'root' });
        const db = exportRec(`export:${p}-db#1`, `${p}-db`);
        await a.insertExport(web2);
        await b.insertExport(web1);
        await a.insertExport(db);
        const mine = async (s: StateStore) => (await s.listExports()).filter((e) => e.id.startsWith(`export:${p}`));
        expect(await mine(b)).toStrictEqual([db, web1, web2]);
        const moved = { ...web2, uri: 'nbd://host-b:10809/web', readOnly: false, runnerPid: 56, runnerToken: 'tok-y', startedAt: '2026-02-01T00:00:00.000Z' };
        await b.insertExport(moved);
        expect(await mine(a)).toStrictEqual([db, web1, moved]);
        await a.deleteExport(web1.id);
        await a.deleteExport(`${web1.id}-missing`);
        expect(await mine(b)).toStrictEqual([db, moved]);
      });

      it('renewOps extends the lease of every operation and export of one runner, and of no other', async () => {
        const p = prefix('renew');
        const op1 = opLocks(`${p}-1`, [`vol:${p}/a`, `vol:${p}/b`], { runnerToken: `${p}-tok` });
        const op2 = opLocks(`${p}-2`, [`vol:${p}/c`], { runnerToken: `${p}-other` });
        const ex1 = exportRec(`export:${p}#1`, `${p}-e1`, { runnerToken: `${p}-tok` });
        const ex2 = exportRec(`export:${p}#2`, `${p}-e2`, { runnerToken: `${p}-other` });
        await a.insertOpLocks(op1);
        await a.insertOpLocks(op2);
        await a.insertExport(ex1);
        await a.insertExport(ex2);
        await b.renewOps(`${p}-tok`, LEASE + 5000);
        const ops = (await a.listOpLocks()).filter((o) => o.id.startsWith(p));
        expect(ops.map((o) => [o.id, o.leaseExpires])).toStrictEqual([[op1.id, LEASE + 5000], [op2.id, LEASE]]);
        const exps = (await a.listExports()).filter((e) => e.id.startsWith(`export:${p}`));
        expect(exps.map((e) => [e.id, e.leaseExpires])).toStrictEqual([[ex1.id, LEASE + 5000], [ex2.id, LEASE]]);
        // Several operations' locks (and stop requests) removed at once, an absent id among them.
        await b.requestOpStop(op2.id);
        await a.deleteOpLocks([op1.id, `${p}-absent`, op2.id]);
        expect((await b.listOpLocks()).filter((o) => o.id.startsWith(p))).toEqual([]);
        expect(await stopTaken(b, op2.id)).toBe(false);
        await a.deleteOpLocks([]);
        await a.deleteExport(ex1.id);
        await a.deleteExport(ex2.id);
      });

      it('lockHolders is the active jobs, the op locks and the maintenance locks, as their own lists give them', async () => {
        const p = prefix('holders');
        await a.insertJob(job(`${p}-run`, { createdAt: '2026-04-01T00:00:00.000Z', fence: 2 ** 33, checkpoint: { at: 1 }, plan: { steps: [] } }));
        await a.insertJob(job(`${p}-done`, { status: 'concluded', createdAt: '2026-04-02T00:00:00.000Z' }));
        await b.insertOpLocks(opLocks(`${p}-op`, [`vol:${p}/x`, `vol:${p}/y`], { leaseExpires: LEASE + 7 }));
        await b.placeMaintenance(`${p}/m`, 'root', 'swap');
        const got = await b.lockHolders();
        const mine = <T extends { id?: string; key?: string }>(xs: T[]) => xs.filter((x) => (x.id ?? x.key ?? '').startsWith(p));
        expect(mine(got.jobs)).toStrictEqual(mine(await a.listJobs({ active: true })));
        expect(mine(got.jobs).map((j) => j.id)).toEqual([`${p}-run`]);
        expect(mine(got.ops)).toStrictEqual(mine(await a.listOpLocks()));
        expect(mine(got.ops)).toHaveLength(1);
        expect(mine(got.maintenance)).toStrictEqual(mine(await a.listMaintenance()));
        expect(mine(got.maintenance)).toEqual([{ key: `${p}/m`, principal: 'root', reason: 'swap' }]);
        await a.deleteJob(`${p}-run`);
        await a.deleteJob(`${p}-done`);
        await a.deleteOpLocks(`${p}-op`);
        await a.removeMaintenance(`${p}/m`);
      });

      it('lockHolders(keys) is only the holders of those keys: a job or an operation whole, maintenance by key', async () => {
        const p = prefix('keyed');
        const k = (n: string) => `${p}/${n}`;
        await a.insertJob(job(`${p}-j1`, { locks: [{ key: k('x'), mode: 'shared' }, { key: k('y'), mode: 'exclusive' }] }));
        await a.insertJob(job(`${p}-j2`, { locks: [{ key: k('z'), mode: 'exclusive' }] }));
        await a.insertJob(job(`${p}-j3`, { status: 'concluded', locks: [{ key: k('x'), mode: 'exclusive' }] }));
        await a.insertOpLocks(opLocks(`${p}-o1`, [k('q'), k('y')]));
        await a.insertOpLocks(opLocks(`${p}-o2`, [k('w')]));
        await a.placeMaintenance(k('y'), 'root', 'swap');
        await a.placeMaintenance(k('w'), 'root', 'swap');
        const got = await b.lockHolders([k('y'), k('nothing')]);
        expect(got.jobs.map((j) => j.id)).toEqual([`${p}-j1`]);
        expect(got.jobs[0]).toStrictEqual(await a.getJob(`${p}-j1`));
        expect(bare(got.ops)).toStrictEqual([opLocks(`${p}-o1`, [k('q'), k('y')])]);
        expect(got.maintenance).toEqual([{ key: k('y'), principal: 'root', reason: 'swap' }]);
        expect(await b.lockHolders([])).toEqual({ jobs: [], ops: [], maintenance: [] });
        for (const id of ['j1', 'j2', 'j3']) await a.deleteJob(`${p}-${id}`);
        await a.deleteOpLocks(`${p}-o1`);
        await a.deleteOpLocks(`${p}-o2`);
        await a.removeMaintenance(k('y'));
        await a.removeMaintenance(k('w'));
      });

      it('a job holds its locks from its record until it concludes or is deleted, whatever it updates meanwhile', async () => {
        const p = prefix('jl');
        const k = (n: string) => `${p}/${n}`;
        const held = async (key: string) => (await b.lockHolders([key])).jobs.map((j) => j.id);
        const j = job(`${p}-j`, { locks: [{ key: k('v'), mode: 'exclusive' }, { key: k('w@s'), mode: 'shared' }] });
        await a.insertJob(j);
        expect(await held(k('v'))).toEqual([j.id]);
        expect((await b.lockHolders([], [`${k('w')}@`])).jobs.map((x) => x.id)).toEqual([j.id]);
        expect(await a.updateJob({ ...j, status: 'paused', progress: { current: 7, total: 10 } })).toBe(true);
        expect(await held(k('w@s'))).toEqual([j.id]);
        expect(await a.updateJob({ ...j, status: 'concluded' })).toBe(true);
        expect(await held(k('v'))).toEqual([]);
        expect((await b.lockHolders([], [`${k('w')}@`])).jobs).toEqual([]);
        const d = job(`${p}-d`, { locks: [{ key: k('x'), mode: 'shared' }] });
        await a.insertJob(d);
        expect(await held(k('x'))).toEqual([d.id]);
        await a.deleteJob(d.id);
        expect(await held(k('x'))).toEqual([]);
        await a.insertJob(job(`${p}-c`, { status: 'concluded', locks: [{ key: k('y'), mode: 'shared' }] }));
        expect(await held(k('y'))).toEqual([]);
        for (const id of ['j', 'c']) await a.deleteJob(`${p}-${id}`);
      });

      it('lockHolders(keys, prefixes) and claimOpLocks(op, also) read the holders of keys starting with a prefix too, and of more keys', async () => {
        const p = prefix('pfx');
        const k = (n: string) => `${p}/${n}`;
        await a.insertJob(job(`${p}-j1`, { locks: [{ key: k('v@b1'), mode: 'shared' }] }));
        await a.insertJob(job(`${p}-j2`, { locks: [{ key: k('v2@b1'), mode: 'shared' }] })); // another volume whose name starts the same
        await a.insertOpLocks(opLocks(`${p}-o1`, [k('w'), k('v@s')]));
        await a.insertOpLocks(opLocks(`${p}-o2`, [k('u')]));
        await a.placeMaintenance(k('v@m'), 'root', 'check');
        await a.placeMaintenance(k('v2@m'), 'root', 'check');
        const got = await b.lockHolders([k('nothing')], [`${k('v')}@`]);
        expect(got.jobs.map((j) => j.id)).toEqual([`${p}-j1`]);
        expect(bare(got.ops)).toStrictEqual([opLocks(`${p}-o1`, [k('w'), k('v@s')])]);
        expect(got.maintenance).toEqual([{ key: k('v@m'), principal: 'root', reason: 'check' }]);
        // An operation matched both by key and by prefix comes once.
        expect(bare((await b.lockHolders([k('w')], [`${k('v')}@`])).ops)).toStrictEqual([opLocks(`${p}-o1`, [k('w'), k('v@s')])]);
        expect(await b.lockHolders([], [])).toEqual({ jobs: [], ops: [], maintenance: [] });
        const claim = opLocks(`${p}-op`, [k('v')]);
        const claimed = await b.claimOpLocks(claim, { keys: [k('u')], prefixes: [`${k('v')}@`] });
        expect(claimed.jobs.map((j) => j.id)).toEqual([`${p}-j1`]);
        expect(bare(claimed.ops).map((o) => o.id).sort()).toEqual([`${p}-o1`, `${p}-o2`, `${p}-op`]);
        expect(claimed.maintenance.map((m) => m.key)).toEqual([k('v@m')]);
        for (const id of ['j1', 'j2']) await a.deleteJob(`${p}-${id}`);
        await a.deleteOpLocks([`${p}-o1`, `${p}-o2`, `${p}-op`]);
        await a.removeMaintenance(k('v@m'));
        await a.removeMaintenance(k('v2@m'));
      });

      it('claimOpLocks records the locks in order and returns lockHolders as of just after, the claim included', async () => {
        const p = prefix('claim');
        await a.insertJob(job(`${p}-run`, { locks: [{ key: `vol:${p}/y`, mode: 'shared' }] }));
        await a.insertJob(job(`${p}-other`, { locks: [{ key: `vol:${p}/elsewhere`, mode: 'shared' }] }));
        await a.placeMaintenance(`vol:${p}/z`, 'root', 'swap');
        await a.placeMaintenance(`vol:${p}/elsewhere`, 'root', 'swap');
        await a.setOwner(`vol:${p}/y`, 'alice');
        await a.setOwner(`vol:${p}/elsewhere`, 'bob');
        const claim = opLocks(`${p}-op`, [`vol:${p}/x`, `vol:${p}/y`, `vol:${p}/z`], { leaseExpires: LEASE + 9 });
        const got = await b.claimOpLocks(claim);
        const mine = <T extends { id?: string; key?: string }>(xs: T[]) => xs.filter((x) => (x.id ?? x.key ?? '').startsWith(p));
        expect(bare(got.ops)).toStrictEqual([claim]);
        // The owner records of the claimed keys, read with it (x and z have none).
        expect(got.owners).toStrictEqual({ [`vol:${p}/y`]: 'alice' });
        await a.deleteOwner(`vol:${p}/y`);
        await a.deleteOwner(`vol:${p}/elsewhere`);
        expect(bare(mine(await a.listOpLocks()))).toStrictEqual([claim]);
        expect(got.jobs).toStrictEqual([await a.getJob(`${p}-run`)]);
        expect(got.maintenance).toEqual([{ key: `vol:${p}/z`, principal: 'root', reason: 'swap' }]);
        await a.deleteJob(`${p}-run`);
        await a.deleteJob(`${p}-other`);
        await a.deleteOpLocks(`${p}-op`);
        await a.removeMaintenance(`vol:${p}/z`);
        await a.removeMaintenance(`vol:${p}/elsewhere`);
        expect(mine(await b.listOpLocks())).toEqual([]);
      });

      it('maintenance: place, replace, list by key, remove', async () => {
        const p = prefix('mnt');
        await a.placeMaintenance(`${p}/b`, 'root', 'disk swap');
        await b.placeMaintenance(`${p}/a`, 'ops', 'firmware');
        await a.placeMaintenance(`${p}/b`, 'ops2', 'disk swap, again');
        const mine = async (s: StateStore) => (await s.listMaintenance()).filter((m) => m.key.startsWith(p));
        expect(await mine(b)).toStrictEqual([
          { key: `${p}/a`, principal: 'ops', reason: 'firmware' },
          { key: `${p}/b`, principal: 'ops2', reason: 'disk swap, again' },
        ]);
        await b.removeMaintenance(`${p}/a`);
        await b.removeMaintenance(`${p}/missing`);
        expect((await mine(a)).map((m) => m.key)).toEqual([`${p}/b`]);
      });

      it('owners: set, replace, get, delete', async () => {
        const ref = `${prefix('own')}/vol`;
        expect(await a.getOwner(ref)).toBeUndefined();
        await a.setOwner(ref, 'alice');
        expect(await b.getOwner(ref)).toBe('alice');
        await b.setOwner(ref, 'bob');
        expect(await a.getOwner(ref)).toBe('bob');
        await a.deleteOwner(ref);
        expect(await b.getOwner(ref)).toBeUndefined();
      });

      it('operations come with their place in the order of claims (seq): a later claim\'s is greater, in every read', async () => {
        const p = prefix('seq');
        const first = await a.claimOpLocks(opLocks(`${p}-1`, [`${p}/v`, `${p}/w`]));
        const second = await b.claimOpLocks(opLocks(`${p}-2`, [`${p}/v`]));
        const seqOf = (ops: OpLockRecord[], id: string) => ops.find((o) => o.id === id)?.seq;
        const s1 = seqOf(first.ops, `${p}-1`)!;
        expect(typeof s1).toBe('number');
        expect(seqOf(second.ops, `${p}-1`)).toBe(s1);
        expect(seqOf(second.ops, `${p}-2`)!).toBeGreaterThan(s1);
        const held = await a.lockHolders([`${p}/v`]);
        expect(seqOf(held.ops, `${p}-2`)).toBe(seqOf(second.ops, `${p}-2`));
        const listed = await b.listOpLocks();
        expect([seqOf(listed, `${p}-1`), seqOf(listed, `${p}-2`)]).toEqual([s1, seqOf(second.ops, `${p}-2`)]);
        await a.deleteOpLocks([`${p}-1`, `${p}-2`]);
      });
    });

    describe('schema', () => {
      it('another store opens the same database as it is (migrations are idempotent) and sees its data', async () => {
        const id = prefix('schema');
        await a.insertJob(job(id));
        const version = await s.schemaVersion();
        expect(version).toBeGreaterThan(0);
        const c = await s.another();
        try {
          expect(c.kind).toBe(a.kind);
          expect(await c.getJob(id)).toStrictEqual(job(id));
          await c.setOwner(`${id}/vol`, 'carol');
          expect(await a.getOwner(`${id}/vol`)).toBe('carol');
        } finally {
          await c.close();
        }
        expect(await s.schemaVersion()).toBe(version);
        expect(await b.getJob(id)).toStrictEqual(job(id)); // closing one store leaves the others working
      });

      it('refuses a database written by a newer build (FailedPrecondition), and changes nothing', async () => {
        const version = await s.schemaVersion();
        await s.setSchemaVersion(version + 97);
        try {
          const err: unknown = await s.another().then(async (c) => {
            await c.close();
            return undefined;
          }, (e: unknown) => e);
          expect(isOffloadError(err, 'FailedPrecondition'), String(err)).toBe(true);
          expect((err as Error).message).toMatch(new RegExp(`schema version ${version + 97}, newer than this build knows \\(${version}\\)`));
          expect(await s.schemaVersion()).toBe(version + 97);
        } finally {
          await s.setSchemaVersion(version);
        }
      });
    });
  });
}
