import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ContainerModule } from 'inversify';
import { BackendFactory, createBroker, silentLogger, tenant, type Broker, type StorageBackend } from '../../core/index.js';
import { OpClaims, type Claimed } from '../../core/jobs/op-claims.js';
import type { LockRequest } from '../../core/locks/lock-manager.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';
import { memoryFactory, memoryModule } from '../support/memory-backend.js';
import { postgresAvailable, startPostgres, type Postgres } from '../support/postgres.js';

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** OpClaims over a fake store: counts the claims made, records what is withdrawn (by id, in batches). */
function claims(holdMs = 60_000) {
  const made: string[] = [];
  const batches: string[][] = [];
  let owners: Record<string, string> = {};
  let maintenance: Claimed['outside']['maintenance'] = [];
  let whole: string[] | undefined;
  const c = new OpClaims(async (ids) => void batches.push(ids), holdMs);
  const claim = async (locks: LockRequest[]) => c.claim(locks, async (): Promise<Claimed> => {
    const id = `op-${made.length + 1}`;
    made.push(id);
    return { id, outside: { foreign: [], maintenance }, owners, recheck: async () => ({ foreign: [], maintenance: [] }), ...(whole ? { wholeVolumes: whole } : {}) };
  });
  return {
    c, claim, made, batches,
    setOwners: (o: Record<string, string>) => { owners = o; },
    setMaintenance: (m: Claimed['outside']['maintenance']) => { maintenance = m; },
    setWhole: (w: string[]) => { whole = w; },
  };
}

const x = (key: string): LockRequest => ({ key, mode: 'exclusive' });
const s = (key: string): LockRequest => ({ key, mode: 'shared' });

describe('OpClaims: a broker keeps its short operations\' claims a moment', () => {
  it('create, snapshot and delete of one volume make one claim; a snapshot key, a stronger mode or another volume needs its own', async () => {
    const t = claims();
    for (const locks of [[x('m/v')], [s('m/v')], [x('m/v')]]) await (await t.claim(locks)).done();
    expect(t.made).toEqual(['op-1']);
    await (await t.claim([s('m/v'), x('m/v@s')])).done(); // m/v is covered, m/v@s is not: one claim for both
    expect(t.made).toEqual(['op-1', 'op-2']);
    await (await t.claim([x('m/v@s')])).done(); // now covered by op-2
    await (await t.claim([s('m/w')])).done();
    await (await t.claim([x('m/w')])).done(); // shared does not cover exclusive
    expect(t.made).toEqual(['op-1', 'op-2', 'op-3', 'op-4']);
    expect(t.batches).toEqual([]);
  });

  it('a claim that holds a volume whole covers requests on its snapshots, in any mode; not another volume\'s', async () => {
    const t = claims();
    t.setWhole(['m/v']);
    await (await t.claim([x('m/v')])).done();
    for (const locks of [[s('m/v'), x('m/v@s')], [x('m/v@t')], [s('m/v@s')]]) await (await t.claim(locks)).done();
    expect(t.made).toEqual(['op-1']);
    await (await t.claim([x('m/v2@s')])).done();
    expect(t.made).toEqual(['op-1', 'op-2']);
  });

  it('a claim is not used by others before its operation found the way clear, nor ever after it met a conflict', async () => {
    const t = claims();
    const first = await t.claim([x('m/v')]);
    await (await t.claim([x('m/v')])).done(); // op-1 not confirmed yet: a claim of its own
    expect(t.made).toEqual(['op-1', 'op-2']);
    await first.withdraw(); // op-1 met a conflict
    await first.done(); // and a late done changes nothing
    expect(t.batches).toEqual([['op-1']]);
    await (await t.claim([x('m/v')])).done(); // op-2 covers it
    expect(t.made).toEqual(['op-1', 'op-2']);
  });

  it('a claim that passed a maintenance lock (an administrator\'s) is not kept: it would cover a tenant\'s request', async () => {
    const t = claims();
    t.setMaintenance([{ key: 'm/v', principal: { id: 'root', role: 'admin' }, reason: 'disk swap' }]);
    await (await t.claim([x('m/v')])).done();
    expect(t.batches).toEqual([['op-1']]);
    t.setMaintenance([]);
    await (await t.claim([x('m/v')])).done();
    expect(t.made).toEqual(['op-1', 'op-2']);
  });

  it('closing: cached claims are removed, and one whose operation ends after is removed then, not kept', async () => {
    const t = claims();
    await (await t.claim([x('m/a')])).done();
    const late = await t.claim([x('m/b')]);
    await t.c.clear();
    expect(t.batches).toEqual([['op-1']]);
    await late.done();
    expect(t.batches).toEqual([['op-1'], ['op-2']]);
    await (await t.claim([x('m/b')])).done();
    expect(t.made).toEqual(['op-1', 'op-2', 'op-3']);
    expect(t.batches).toEqual([['op-1'], ['op-2'], ['op-3']]);
  });

  it('lapsed claims are removed together; one in use when it lapses goes when its operation ends, and is not used after', async () => {
    const t = claims(40);
    await (await t.claim([x('m/a')])).done();
    await (await t.claim([x('m/b')])).done();
    const busy = await t.claim([x('m/c')]);
    await busy.done();
    const again = await t.claim([x('m/c')]); // under op-3, which lapses while this runs
    expect(t.made).toHaveLength(3);
    for (let i = 0; i < 100 && t.batches.flat().length < 2; i++) await sleep(10);
    await sleep(100); // a sweep or two more: op-3 lapses meanwhile, still in use
    // Swept by one or two sweeps (each takes what lapsed since the last), not one statement each.
    expect(t.batches.flat()).toEqual(['op-1', 'op-2']);
    const swept = t.batches.length;
    await (await t.claim([x('m/c')])).done(); // op-3 lapsed: a new claim
    expect(t.made).toEqual(['op-1', 'op-2', 'op-3', 'op-4']);
    await again.done();
    expect(t.batches.slice(swept)).toEqual([['op-3']]);
    await t.c.clear();
    expect(t.batches.slice(swept)).toEqual([['op-3'], ['op-4']]);
  });

  it('the owner records read with a claim answer while it stands, follow this broker\'s own writes, and are unknown without one', async () => {
    const t = claims();
    t.setOwners({ 'm/v': 'alice' });
    expect(t.c.owner('m/v')).toBeUndefined();
    const op = await t.claim([x('m/v'), s('m/w')]);
    expect(t.c.owner('m/v')).toBe('alice'); // already during the operation that claimed it
    expect(t.c.owner('m/w')).toBeNull(); // read: no record
    await op.done();
    t.c.noteOwner('m/w', 'bob');
    t.c.noteOwner('m/v', null);
    expect([t.c.owner('m/v'), t.c.owner('m/w'), t.c.owner('m/z')]).toEqual([null, 'bob', undefined]);
    t.c.noteOwner('m/w', undefined); // a write that failed: not known any more, the store is asked
    expect(t.c.owner('m/w')).toBeUndefined();
    await t.c.clear();
    expect(t.c.owner('m/w')).toBeUndefined();
  });

  it('a claim that waits in line forgets the owners it read (the operation it waits for may change them); one that lapsed meanwhile is not kept', async () => {
    const t = claims(30);
    t.setOwners({ 'm/v': 'alice' });
    const op = await t.claim([x('m/v')]);
    expect(t.c.owner('m/v')).toBe('alice');
    await op.recheck!();
    expect(t.c.owner('m/v')).toBeUndefined(); // the store is asked
    t.c.noteOwner('m/v', 'bob'); // its own writes are known again
    expect(t.c.owner('m/v')).toBe('bob');
    await sleep(40); // it lapses while its operation still waits
    await op.done();
    expect(t.batches).toEqual([['op-1']]); // removed at once, not left for the next sweep
    await (await t.claim([x('m/v')])).done();
    expect(t.made).toEqual(['op-1', 'op-2']);
    await t.c.clear();
  });
});

describe('brokers sharing a state with claims kept', () => {
  /** Two brokers on one state. Each has its own memory backend of the same name (the locks' keys are the same), or with `shared` one backend for both, as two hosts share an array. */
  async function two(o: { shared?: boolean } = {}): Promise<{ a: Broker; b: Broker; store: SqliteStateStore }> {
    const state = mkdtempSync(join(tmpdir(), 'offload-claims-'));
    cleanups.push(() => rmSync(state, { recursive: true, force: true }));
    let one: Promise<StorageBackend> | undefined;
    const plugin = o.shared ? new ContainerModule(({ bind }) => {
      bind(BackendFactory).toConstantValue({ ...memoryFactory, create: (config: never) => (one ??= memoryFactory.create(config, undefined as never)) });
    }) : memoryModule;
    const open = async () => {
      const b = await createBroker({ state, backends: [{ name: 'm', kind: 'memory' }] as never }, { plugins: [plugin], logger: silentLogger });
      cleanups.push(() => b.close());
      return b;
    };
    const a = await open();
    const b = await open();
    const store = new SqliteStateStore(join(state, 'jobs.sqlite'));
    cleanups.push(() => store.close());
    return { a, b, store };
  }
  const opIds = async (store: SqliteStateStore) => (await store.listOpLocks()).map((o) => o.id);

  it('one claim in the store for a volume\'s create, snapshot and snapshot delete; another broker\'s conflicting create waits for it to lapse, then runs', async () => {
    const { a, b, store } = await two();
    await a.volumes.create('m/v', { sizeBytes: 1 << 20 });
    const claimed = await opIds(store);
    expect(claimed).toHaveLength(1);
    await a.snapshots.create('m/v@s');
    expect(await opIds(store)).toEqual(claimed);
    await a.snapshots.delete('m/v@s'); // the volume's claim holds it whole (whole-volume.ts)
    expect(await opIds(store)).toEqual(claimed);
    await b.volumes.create('m/v', { sizeBytes: 1 << 20 }); // waits for a's claims: not Busy
    for (let i = 0; i < 100 && (await opIds(store)).length > 0; i++) await sleep(20);
    expect(await opIds(store)).toEqual([]);
  });

  it('placing a maintenance lock waits out other brokers\' claims: a tenant\'s next operation under one is refused', async () => {
    const { a, b } = await two();
    const alice = a.as(tenant('alice'));
    await alice.volumes.create('m/v', { sizeBytes: 1 << 20 });
    await b.locks.maintenance('m/v', 'disk swap');
    // a's claim on m/v was made before the maintenance lock: it must not let alice through.
    await expect(alice.volumes.resize('m/v', 2 << 20)).rejects.toMatchObject({ code: 'Busy', message: expect.stringMatching(/disk swap/) });
    await b.locks.release('m/v');
    await alice.volumes.resize('m/v', 2 << 20);
  });

  it('an administrator\'s operation under a maintenance lock does not let a tenant through after it', async () => {
    const { a } = await two();
    const alice = a.as(tenant('alice'));
    await alice.volumes.create('m/v', { sizeBytes: 1 << 20 });
    await a.locks.maintenance('m/v', 'disk swap');
    await a.volumes.resize('m/v', 2 << 20); // the administrator passes it
    await expect(alice.volumes.resize('m/v', 3 << 20)).rejects.toMatchObject({ code: 'Busy', message: expect.stringMatching(/disk swap/) });
    await expect(alice.snapshots.create('m/v@s')).rejects.toMatchObject({ code: 'Busy' });
  });

  it('an owner another broker records is seen once it could change it: the claim that knew the old one has lapsed', async () => {
    const { a, b } = await two();
    const alice = a.as(tenant('alice'));
    await alice.volumes.create('m/v', { sizeBytes: 1 << 20 });
    expect((await alice.volumes.get('m/v')).owner).toBe('alice');
    await b.volumes.delete('m/v'); // waits for a's claim to lapse
    await b.volumes.create('m/v', { sizeBytes: 1 << 20, owner: 'bob' });
    // m/v is still in a's own memory backend; its owner record is bob's now, and a reads it from the store.
    await expect(alice.volumes.get('m/v')).rejects.toMatchObject({ code: 'NotFound' });
    await a.as(tenant('bob')).volumes.resize('m/v', 2 << 20);
  });

  it('a create that waited in line reads the owner after the wait: an administrator\'s create of a tenant\'s volume made meanwhile keeps the tenant\'s', async () => {
    const { a, b, store } = await two({ shared: true });
    await b.volumes.delete('m/v'); // b holds a claim on m/v a moment (nothing there to delete)
    const creating = a.volumes.create('m/v', { sizeBytes: 1 << 20 }); // its claim reads no owner, then waits for b's
    await b.as(tenant('alice')).volumes.create('m/v', { sizeBytes: 1 << 20 }); // under b's claim
    const made = await creating; // idempotent: the volume that is there, as it is
    expect(made.owner).toBe('alice');
    expect(await store.getOwner('m/v')).toBe('alice');
    expect((await a.as(tenant('alice')).volumes.get('m/v')).owner).toBe('alice');
  });

  // Whichever order the lock gives them (under load a's claim may lapse first, and b's request go
  // before the delete), bob's volume comes out as bob made it: only the check under the lock
  // keeps alice's request, allowed before it waited, off it.
  it.each([
    ['delete', (v: Broker) => v.volumes.delete('m/v')],
    ['resize', (v: Broker) => v.volumes.resize('m/v', 2 << 20)],
    ['snapshot', (v: Broker) => v.snapshots.create('m/v@alices')],
  ] as const)('a tenant\'s %s checks the owner again under the lock: a volume deleted and made again by another tenant while it waited is not its own', async (_verb, act) => {
    const { a, b, store } = await two({ shared: true });
    const alice = a.as(tenant('alice'));
    await alice.volumes.create('m/v', { sizeBytes: 1 << 20 }); // a holds a claim on m/v a moment
    const retry = act(b.as(tenant('alice'))).then(() => 'done', (e: { code?: string }) => e.code); // allowed (the record says alice's), then it waits for a's claim
    await alice.volumes.delete('m/v');
    await a.as(tenant('bob')).volumes.create('m/v', { sizeBytes: 1 << 20 }); // bob's now
    expect(['done', 'NotFound']).toContain(await retry);
    expect(await store.getOwner('m/v')).toBe('bob');
    const bob = a.as(tenant('bob'));
    expect((await bob.volumes.get('m/v')).sizeBytes).toBe(1 << 20);
    expect(await bob.snapshots.list('m/v')).toEqual([]);
  });

  it('a tenant\'s copy checks the source\'s owner again under the job\'s locks: made again by another tenant while the job waited, it is not read', async () => {
    const { a, b } = await two({ shared: true });
    const alice = a.as(tenant('alice'));
    await b.as(tenant('alice')).volumes.create('m/t', { sizeBytes: 1 << 20 });
    await alice.volumes.create('m/v', { sizeBytes: 1 << 20 }); // a holds a claim on m/v a moment
    const dev = await alice.volumes.open('m/v', 'rw');
    await dev.write(0, Buffer.alloc(4096, 0x41));
    await dev.close();
    const copying = b.as(tenant('alice')).copy('m/v', 'm/t').then(async (j) => ((await j.wait()).error ? 'failed' : 'copied'), (e: { code?: string }) => e.code);
    const swapping = (async () => {
      await sleep(10); // the copy's checks before its locks are done: its job waits for a's claim
      await alice.volumes.delete('m/v');
      await a.as(tenant('bob')).volumes.create('m/v', { sizeBytes: 1 << 20 }); // bob's now: zeros
      return 'swapped';
    })().catch((e: { code?: string }) => e.code);
    const [copy, swap] = await Promise.all([copying, swapping]);
    // Whichever went first: refused under its locks, or alice's data copied before her delete (which then met the job, or came after it).
    expect(['NotFound', 'copied']).toContain(copy);
    expect(['swapped', 'Busy']).toContain(swap);
    if (copy === 'copied') {
      const t = await b.as(tenant('alice')).volumes.open('m/t', 'r');
      expect(Buffer.from(await t.read(0, 4096)).equals(Buffer.alloc(4096, 0x41))).toBe(true);
      await t.close();
    }
  });

  it('an owner record of a volume that is not there (a broker killed between deleting the volume and its record) does not keep the name, nor give it to its old owner', async () => {
    const { a, store } = await two();
    await store.setOwner('m/v', 'carol');
    await store.setOwner('m/w', 'carol');
    const bob = await a.as(tenant('bob')).volumes.create('m/v', { sizeBytes: 1 << 20 });
    expect(bob.owner).toBe('bob');
    expect((await a.volumes.create('m/w', { sizeBytes: 1 << 20 })).owner).toBe('admin');
    await expect(a.as(tenant('carol')).volumes.get('m/w')).rejects.toMatchObject({ code: 'NotFound' });
    // A volume that is there keeps its owner: an administrator's create returns it as it is, a tenant's is refused.
    expect((await a.volumes.create('m/v', { sizeBytes: 1 << 20 })).owner).toBe('bob');
    await expect(a.as(tenant('carol')).volumes.create('m/v', { sizeBytes: 1 << 20 })).rejects.toMatchObject({ code: 'AlreadyExists' });
  });
});

/**
 * A broker whose operations on one volume follow each other closely keeps claims there without a
 * gap (each is reused, then the next made before the last one's rows are gone). Another broker
 * waiting for the volume waits in line, its claim published: the first broker's next claim sees it
 * and waits in turn. Withdrawn and polled instead, the waiting broker gave up after 30 s (Busy).
 */
describe.each([
  { store: 'SQLite', skip: false },
  { store: 'PostgreSQL', skip: !postgresAvailable() },
])('brokers taking turns on one volume ($store)', ({ store, skip }) => {
  let pg: Postgres | undefined;
  beforeAll(async () => {
    if (store === 'PostgreSQL' && !skip) pg = await startPostgres();
  });
  afterAll(async () => {
    await pg?.stop();
  });

  async function twoBrokers(): Promise<[Broker, Broker]> {
    const dir = mkdtempSync(join(tmpdir(), 'offload-turns-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const state = pg ? await pg.createDatabase() : dir;
    const open = async (n: number) => {
      const b = await createBroker({ state, ...(pg ? { stateDir: join(dir, `b${n}`) } : {}), backends: [{ name: 'm', kind: 'memory' }] as never }, { plugins: [memoryModule], logger: silentLogger });
      cleanups.push(() => b.close());
      return b;
    };
    return [await open(1), await open(2)];
  }

  it.skipIf(skip)('a broker operating on a volume without pause does not keep another broker from it: the other gets in line, and both go on', async () => {
    const [a, b] = await twoBrokers();
    await a.volumes.create('m/v', { sizeBytes: 1 << 20 });
    await b.volumes.create('m/v', { sizeBytes: 1 << 20 }); // each broker its own memory backend: the lock keys are the same
    let ops = 0;
    let bDoneAt: number | undefined;
    // a: snapshot and delete, over and over, a moment apart; until it has done 10 more after b got through.
    const looping = (async () => {
      for (let i = 0; bDoneAt === undefined || ops < bDoneAt + 10; i++) {
        await a.snapshots.create(`m/v@s${i}`);
        await a.snapshots.delete(`m/v@s${i}`);
        ops++;
        await sleep(2);
      }
    })();
    while (ops < 10) await sleep(5);
    const startedAt = ops;
    try {
      await b.volumes.resize('m/v', 2 << 20); // Busy ("did not end in time") after 30 s before
      bDoneAt = ops;
    } finally {
      bDoneAt ??= ops; // a failed: a stops too
      await looping;
    }
    expect(bDoneAt).toBeGreaterThanOrEqual(startedAt); // a was still at it when b got its turn…
    expect(ops).toBe(bDoneAt + 10); // …and went on after it
    expect((await b.volumes.get('m/v')).sizeBytes).toBe(2 << 20);
  });
});
