import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { ADMIN, LockManager, silentLogger, type JobTask, type LockRequest } from '../../core/index.js';
import { JobManager, type JobManagerOptions } from '../../core/jobs/job-manager.js';
import { tenant, type Principal } from '../../core/locks/principal.js';
import { keysToRead, snapshotPrefixes, snapshotVolume, wholeVolumes, withWholeVolumes } from '../../core/locks/whole-volume.js';
import { openPostgresStore } from '../../core/state/postgres/postgres-store.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';
import type { StateStore } from '../../core/state/state-store.js';
import { postgresAvailable, startPostgres, type Postgres } from '../support/postgres.js';

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  vi.restoreAllMocks();
  for (const c of cleanups.splice(0).reverse()) await c();
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const x = (key: string): LockRequest => ({ key, mode: 'exclusive' });
const s = (key: string): LockRequest => ({ key, mode: 'shared' });
const op = (id: string) => ({ id, principal: ADMIN, description: `${id} m/v` });

describe('whole volumes: the rule as functions', () => {
  it('a snapshot key\'s volume; a file\'s key or a volume\'s has none', () => {
    expect(snapshotVolume('m/v@s')).toBe('m/v');
    expect(snapshotVolume('m/v')).toBeUndefined();
    expect(snapshotVolume('file:/tmp/a@b')).toBeUndefined();
    expect(snapshotVolume('file:/tmp/x/y@z')).toBeUndefined();
    expect(keysToRead(['m/v@s', 'm/w', 'file:/a@b'])).toEqual(['m/v@s', 'm/w', 'file:/a@b', 'm/v']);
    expect(snapshotPrefixes([x('m/v'), s('m/w'), x('m/u@s'), x('file:/f')])).toEqual(['m/v@']);
  });

  it('a volume held exclusively is whole unless another holds one of its snapshots (a lock or a maintenance lock)', () => {
    const holder = { id: 'job-1', principal: ADMIN, description: 'backup' };
    expect(wholeVolumes([x('m/v'), x('m/w'), s('m/u')], { foreign: [], maintenance: [] })).toEqual(['m/v', 'm/w']);
    expect(wholeVolumes([x('m/v'), x('m/w')], { foreign: [{ key: 'm/v@b1', mode: 'shared', holder }], maintenance: [{ key: 'm/w@s', principal: ADMIN, reason: 'r' }] })).toEqual([]);
    // A volume whose name starts like another's is another volume.
    expect(wholeVolumes([x('m/v')], { foreign: [{ key: 'm/v2@s', mode: 'shared', holder }], maintenance: [] })).toEqual(['m/v']);
  });

  it('another broker\'s short operation holding a volume exclusively holds the requested snapshot keys; a job or an export does not, nor a shared lock', () => {
    const f = (id: string, key: string, mode: 'shared' | 'exclusive') => ({ key, mode, holder: { id, principal: ADMIN, description: id } });
    const got = withWholeVolumes([f('op-1', 'm/v', 'exclusive'), f('job-1', 'm/w', 'exclusive'), f('export:e', 'm/u', 'exclusive'), f('op-2', 'm/t', 'shared')], ['m/v@s', 'm/w@s', 'm/u@s', 'm/t@s', 'm/v']);
    expect(got.slice(4).map((e) => [e.key, e.mode, e.holder.id])).toEqual([['m/v@s', 'exclusive', 'op-1']]);
  });
});

/** Two brokers' job managers and lock managers on one state (SQLite, or PostgreSQL at `url`), as `createBroker` wires them. */
async function brokers(url?: string, opts: JobManagerOptions = {}): Promise<{ a: Side; b: Side }> {
  const dir = mkdtempSync(join(tmpdir(), 'offload-whole-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const side = async (): Promise<Side> => {
    const store: StateStore = url ? await openPostgresStore(url, { poolSize: 2 }) : new SqliteStateStore(join(dir, 'jobs.sqlite'));
    const locks: LockManager = new LockManager({
      outside: (keys) => jobs.outsideLocks(store, keys),
      placeMaintenance: (key, p, reason) => store.placeMaintenance(key, p.id, reason),
      removeMaintenance: (key) => store.removeMaintenance(key),
    });
    const jobs = new JobManager(store, locks, async () => undefined, silentLogger, opts);
    cleanups.push(async () => {
      await jobs.close();
      await store.close();
    });
    /** A short operation's locks as runShort takes them: acquirePublished through the broker's kept claims. */
    const short = (id: string, wanted: LockRequest[], who: Principal = ADMIN) =>
      locks.acquirePublished(wanted, { ...op(id), principal: who }, () => jobs.publishShort(id, wanted, who, `${id} m/v`), 2_000);
    return { store, locks, jobs, short };
  };
  return { a: await side(), b: await side() };
}
interface Side {
  store: StateStore;
  locks: LockManager;
  jobs: JobManager;
  short: (id: string, wanted: LockRequest[], who?: Principal) => Promise<{ release(): Promise<void> }>;
}

/** A job that runs until `end()`. */
function heldTask(): { task: JobTask; end: () => void } {
  let end!: () => void;
  const done = new Promise<void>((r) => (end = r));
  cleanups.push(() => end()); // before its manager closes (cleanups run last first)
  return { task: { type: 'test', params: {}, run: async () => done }, end };
}

/** The liveness case: a job on a snapshot against another broker's operations on its volume, back to back. */
async function jobWaitsInLine(url?: string): Promise<void> {
  const { a, b } = await brokers(url);
  const t = heldTask();
  let started = false;
  let ops = 0;
  // A's operations on m/v (a millisecond of work each) follow each other with no gap: some claim
  // of A's on m/v is always in the store, and until B's job waits in line each new one covers
  // m/v@b1 as well.
  const first = await a.short('op-0', [x('m/v')]);
  const starting = b.jobs.start({ task: t.task, ref: 'm/bk', executor: 'host', principal: ADMIN, locks: [s('m/v@b1')] }).finally(() => {
    started = true;
  });
  await first.release();
  while (!started) {
    const l = await a.short(`op-${++ops}`, [x('m/v')]);
    await sleep(1);
    await l.release();
  }
  const job = await starting; // Busy after 30 s before jobs waited in line
  expect(ops).toBeGreaterThan(0);
  // Once it runs, A's next claims do not cover m/v@b1: a request on it is checked, and refused.
  await expect(a.short('op-x', [s('m/v'), x('m/v@b1')])).rejects.toMatchObject({ code: 'Busy', message: expect.stringMatching(/m\/v@b1.*job/) });
  t.end();
  await job.wait();
}

describe('whole volumes: brokers on one state', () => {
  it('a job on a snapshot waits in line: another broker\'s operations on the volume, back to back, do not keep it out', () => jobWaitsInLine());

  it('a broker\'s claim on a volume covers its next requests on the volume\'s snapshots: one claim in the store', async () => {
    const { a } = await brokers();
    const claims = vi.spyOn(a.store, 'claimOpLocks');
    await (await a.short('op-1', [x('m/v')])).release(); // create
    await (await a.short('op-2', [s('m/v')])).release(); // snapshot
    await (await a.short('op-3', [s('m/v'), x('m/v@s')])).release(); // snapshot delete
    await (await a.short('op-4', [x('m/v')])).release(); // delete
    expect(claims).toHaveBeenCalledTimes(1);
  });

  it('another broker\'s job on a snapshot of the volume waits for the claim, then starts', async () => {
    const { a, b } = await brokers();
    const lease = await a.short('op-1', [x('m/v')]);
    const t = heldTask();
    let started = false;
    const starting = b.jobs.start({ task: t.task, ref: 'm/bk', executor: 'host', principal: ADMIN, locks: [s('m/v@b1')] }).then((j) => {
      started = true;
      return j;
    });
    await sleep(300);
    expect(started).toBe(false); // the operation holds m/v whole
    await lease.release();
    const job = await starting; // once the claim lapses
    t.end();
    await job.wait();
  });

  it('an export of a snapshot waits in line too: another broker\'s operations on the volume, back to back, do not keep it out', async () => {
    const { a, b } = await brokers();
    let served = false;
    let ops = 0;
    const first = await a.short('op-0', [x('m/v')]);
    // The locks of an export of m/v@b1 (core/broker/exports.ts holdExport), taken as it takes them.
    const wanted = [s('m/v'), s('m/v@b1')];
    const holder = { id: 'export:bk#1', principal: ADMIN, description: 'nbd export bk of m/v@b1' };
    const serving = b.locks.acquirePublished(wanted, holder, () => b.jobs.publishOperation(holder.id, wanted, ADMIN, holder.description)).finally(() => {
      served = true;
    });
    await first.release();
    while (!served) {
      try {
        const l = await a.short(`op-${++ops}`, [x('m/v')]);
        await sleep(1);
        await l.release();
      } catch (e) {
        // Meeting the export's claim while it waits in line: refused, as by the export.
        expect(e).toMatchObject({ code: 'Busy', message: expect.stringMatching(/export bk/) });
        await sleep(1);
      }
    }
    const lease = await serving; // Busy after 30 s before exports waited in line
    expect(ops).toBeGreaterThan(0);
    await lease.release();
  });

  it('while a job waits in line, other brokers meeting its claim are refused as by the job; once it runs, its record holds the keys', async () => {
    const { a, b } = await brokers();
    const lease = await a.short('op-1', [x('m/v')]);
    const t = heldTask();
    const starting = b.jobs.start({ task: t.task, ref: 'm/bk', executor: 'host', principal: ADMIN, locks: [s('m/v@b1')] });
    // Its claim is in the store under the job's id while it waits for A's operation.
    for (let i = 0; i < 500 && !(await a.store.lockHolders(['m/v@b1'])).ops.some((o) => o.id.startsWith('test-')); i++) await sleep(5);
    await expect(a.short('op-2', [x('m/v@b1')])).rejects.toMatchObject({ code: 'Busy', message: expect.stringMatching(/m\/v@b1.*job test-/) });
    await lease.release();
    const job = await starting;
    const held = await a.store.lockHolders(['m/v@b1']);
    expect(held.ops).toEqual([]); // the claim is withdrawn…
    expect(held.jobs.map((j) => j.id)).toEqual([job.id]); // …and the record holds the key
    t.end();
    await job.wait();
  });

  it('a claim on a volume one of whose snapshots another broker holds does not cover that snapshot: the request is checked, and refused', async () => {
    const { a, b } = await brokers();
    const t = heldTask();
    const job = await b.jobs.start({ task: t.task, ref: 'm/bk', executor: 'host', principal: ADMIN, locks: [s('m/v@b1')] }); // a backup reading m/v@b1
    const claims = vi.spyOn(a.store, 'claimOpLocks');
    await (await a.short('op-1', [x('m/v')])).release(); // resize: m/v is not whole
    await expect(a.short('op-2', [s('m/v'), x('m/v@b1')])).rejects.toMatchObject({ code: 'Busy', message: expect.stringMatching(/m\/v@b1.*job/) });
    // Nor another of its snapshots: the claim covers none of them.
    await (await a.short('op-3', [s('m/v'), x('m/v@other')])).release();
    expect(claims).toHaveBeenCalledTimes(3);
    t.end();
    await job.wait();
  });

  it('a claim whose removal failed is removed again at the next heartbeat: it does not hold its key against others while its broker runs on', async () => {
    const { a, b } = await brokers(undefined, { leaseMs: 600 });
    const removals = vi.spyOn(a.store, 'deleteOpLocks').mockRejectedValueOnce(new Error('the database was away for a moment'));
    await (await a.short('op-1', [x('m/v')])).release(); // kept 50 ms; its sweep fails
    // A works on another volume meanwhile: its leases are renewed, the row of op-1's with them.
    let stop = false;
    const working = (async () => {
      for (let i = 2; !stop; i++) {
        const l = await a.short(`op-${i}`, [x('m/w')]);
        await sleep(5);
        await l.release();
      }
    })();
    try {
      await (await b.short('op-b', [x('m/v')])).release(); // Busy after 2 s while the row stayed
    } finally {
      stop = true;
      await working;
    }
    expect(removals.mock.calls.length).toBeGreaterThan(1);
  });

  it('a claim made again under its id after its removal failed keeps its new rows: the heartbeat\'s retry does not take them', async () => {
    const { a, b } = await brokers(undefined, { leaseMs: 600 });
    // B runs a tenant's job on m/v; an administrator's operation on A meets it, withdraws its claim
    // (that removal fails, the tenant's job ending meanwhile), and claims again under the same id.
    const t = heldTask();
    const job = await b.jobs.start({ task: t.task, ref: 'm/v', executor: 'host', principal: tenant('t1'), locks: [x('m/v')] });
    vi.spyOn(a.store, 'deleteOpLocks').mockImplementationOnce(async () => {
      t.end();
      await job.wait();
      throw new Error('the database was away for a moment');
    });
    const lease = await a.short('op-admin', [x('m/v')]);
    await sleep(500); // two of A's heartbeats
    expect((await a.store.lockHolders(['m/v'])).ops.map((o) => o.id)).toEqual(['op-admin']);
    await expect(b.short('op-b', [x('m/v')])).rejects.toMatchObject({ code: 'Busy', message: expect.stringMatching(/op-admin/) });
    await lease.release();
  });

  it('a job being recorded is not an orphan to its own broker\'s adopter, however long its claim takes to withdraw', async () => {
    const events: string[] = [];
    const { a } = await brokers(undefined, { onEvent: (e) => void events.push(e.type) });
    a.jobs.adoptOrphans({ everyMs: 5 });
    const remove = a.store.deleteOpLocks.bind(a.store);
    vi.spyOn(a.store, 'deleteOpLocks').mockImplementation(async (ids) => {
      await sleep(100);
      return remove(ids);
    });
    const t = heldTask();
    const job = await a.jobs.start({ task: t.task, ref: 'm/bk', executor: 'host', principal: ADMIN, locks: [s('m/v@b1')] });
    await sleep(50);
    expect(events).not.toContain('takeover');
    expect((await a.store.getJob(job.id))?.fence).toBe(1);
    t.end();
    await job.wait();
  });

  it('a maintenance lock placed while a tenant\'s job waits keeps the job out; an administrator\'s passes', async () => {
    const { a, b } = await brokers();
    const start = (who: Principal) => a.jobs.start({
      task: heldTask().task, ref: 'm/bk', executor: 'host', principal: who, locks: [s('m/v@b1')],
      check: () => b.store.placeMaintenance('m/v@b1', 'ops', 'checking the snapshot').catch(() => undefined), // placed after the job's checks, before it is recorded
    });
    await expect(start(tenant('t1'))).rejects.toMatchObject({ code: 'Busy', message: expect.stringMatching(/m\/v@b1 is busy: it is under maintenance by ops/) });
    expect(await a.store.listJobs()).toEqual([]);
    const job = await start(ADMIN);
    expect((await a.store.getJob(job.id))?.status).not.toBe('concluded');
  });

  it('a maintenance lock on a snapshot keeps the volume\'s claim from covering it', async () => {
    const { a, b } = await brokers();
    await b.locks.placeMaintenance('m/v@s', ADMIN, 'checking');
    const claims = vi.spyOn(a.store, 'claimOpLocks');
    await (await a.short('op-1', [x('m/v')])).release();
    await (await a.short('op-2', [s('m/v'), x('m/v@s')])).release(); // an administrator passes it, but it is checked
    expect(claims).toHaveBeenCalledTimes(2);
  });
});

describe.skipIf(!postgresAvailable())('whole volumes: brokers on one PostgreSQL database', () => {
  let server: Postgres;
  beforeAll(async () => {
    server = await startPostgres();
  });
  afterAll(() => server?.stop());

  it('a job on a snapshot waits in line: another broker\'s operations on the volume, back to back, do not keep it out', async () => jobWaitsInLine(await server.createDatabase()));
});
