import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { createBroker, silentLogger, tenant, type Broker } from '../../core/index.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';
import { memoryModule } from '../support/memory-backend.js';

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  vi.restoreAllMocks();
  for (const c of cleanups.splice(0).reverse()) await c();
});

/** A broker on a memory backend `m`, and a second connection to its state to look at the owner records. */
async function broker(): Promise<{ b: Broker; store: SqliteStateStore }> {
  const state = mkdtempSync(join(tmpdir(), 'offload-owners-'));
  cleanups.push(() => rmSync(state, { recursive: true, force: true }));
  const b = await createBroker({ state, backends: [{ name: 'm', kind: 'memory' }] as never }, { plugins: [memoryModule], logger: silentLogger });
  cleanups.push(() => b.close());
  const store = new SqliteStateStore(join(state, 'jobs.sqlite'));
  cleanups.push(() => store.close());
  return { b, store };
}

describe('owner records: the administrators\' volumes have none', () => {
  it('an administrator\'s volume: no record, shown as the administrators\', kept from tenants and from being handed over by a create', async () => {
    const { b, store } = await broker();
    expect((await b.volumes.create('m/v', { sizeBytes: 1 << 20 })).owner).toBe('admin');
    expect(await store.getOwner('m/v')).toBeUndefined();
    expect((await b.volumes.get('m/v')).owner).toBe('admin');
    expect((await b.volumes.list('m')).items.map((v) => v.owner)).toEqual(['admin']);
    const alice = b.as(tenant('alice'));
    await expect(alice.volumes.get('m/v')).rejects.toMatchObject({ code: 'NotFound' });
    expect((await alice.volumes.list('m')).items).toEqual([]);
    await expect(alice.volumes.create('m/v', { sizeBytes: 1 << 20 })).rejects.toMatchObject({ code: 'AlreadyExists' });
    // An administrator naming another owner does not take it from the administrators either.
    await expect(b.volumes.create('m/v', { sizeBytes: 1 << 20, owner: 'alice' })).rejects.toMatchObject({ code: 'AlreadyExists', message: expect.stringMatching(/administrators/) });
    // Idempotent for the administrators: the volume as it is.
    expect((await b.volumes.create('m/v', { sizeBytes: 1 << 20 })).owner).toBe('admin');
    expect(await store.getOwner('m/v')).toBeUndefined();
  });

  it('a tenant\'s volume has its record from the create to the delete, whoever deletes it', async () => {
    const { b, store } = await broker();
    await b.volumes.create('m/a', { sizeBytes: 1 << 20, owner: 'alice' });
    expect(await store.getOwner('m/a')).toBe('alice');
    await b.as(tenant('bob')).volumes.create('m/b', { sizeBytes: 1 << 20 });
    expect(await store.getOwner('m/b')).toBe('bob');
    expect((await b.as(tenant('alice')).volumes.get('m/a')).owner).toBe('alice');
    await b.volumes.delete('m/a');
    await b.as(tenant('bob')).volumes.delete('m/b');
    expect(await store.getOwner('m/a')).toBeUndefined();
    expect(await store.getOwner('m/b')).toBeUndefined();
    // The names are free: an administrator's volume of that name is not alice's.
    await b.volumes.create('m/a', { sizeBytes: 1 << 20 });
    await expect(b.as(tenant('alice')).volumes.get('m/a')).rejects.toMatchObject({ code: 'NotFound' });
  });

  it('an administrator\'s create, snapshot and delete write no owner record; a tenant\'s create and delete write one each', async () => {
    const { b } = await broker();
    const set = vi.spyOn(SqliteStateStore.prototype, 'setOwner');
    const del = vi.spyOn(SqliteStateStore.prototype, 'deleteOwner');
    await b.volumes.create('m/v', { sizeBytes: 1 << 20 });
    await b.snapshots.create('m/v@s');
    await b.snapshots.delete('m/v@s');
    await b.volumes.delete('m/v');
    expect([set.mock.calls.length, del.mock.calls.length]).toEqual([0, 0]);
    const alice = b.as(tenant('alice'));
    await alice.volumes.create('m/w', { sizeBytes: 1 << 20 });
    await alice.volumes.delete('m/w');
    expect(set.mock.calls).toEqual([['m/w', 'alice']]);
    expect(del.mock.calls).toEqual([['m/w']]);
  });

  it('a listing reads the owner records of its page at once: one statement, whoever lists', async () => {
    const { b } = await broker();
    for (const [name, owner] of [['a1', 'alice'], ['b1', 'bob'], ['x1', undefined], ['a2', 'alice']] as const) {
      await b.volumes.create(`m/${name}`, { sizeBytes: 1 << 20, ...(owner ? { owner } : {}) });
    }
    await new Promise((r) => setTimeout(r, 80)); // the creates' claims lapse: their owners are no longer known here
    const one = vi.spyOn(SqliteStateStore.prototype, 'getOwner');
    const many = vi.spyOn(SqliteStateStore.prototype, 'getOwners');
    const names = (vs: { name: string; owner?: string }[]) => vs.map((v) => `${v.name}:${v.owner}`).sort();
    // The memory backend's pages hold 3 volumes: two pages, two reads, for each.
    expect(names(await b.volumes.listAll('m'))).toEqual(['a1:alice', 'a2:alice', 'b1:bob', 'x1:admin']);
    expect(names(await b.as(tenant('alice')).volumes.listAll('m'))).toEqual(['a1:alice', 'a2:alice']);
    expect(names(await b.as(tenant('carol')).volumes.listAll('m'))).toEqual([]);
    expect([one.mock.calls.length, many.mock.calls.length]).toEqual([0, 6]);
  });

  it('the owner shown is the one access is judged by: not one the backend keeps for a volume made outside the broker', async () => {
    const { b } = await broker();
    await b.backend('m').createVolume({ name: 'tagged', sizeBytes: 1 << 20, owner: 'alice' }); // outside the broker, tagged for alice
    expect((await b.volumes.get('m/tagged')).owner).toBe('admin');
    expect((await b.volumes.listAll('m')).map((v) => v.owner)).toEqual(['admin']);
    await expect(b.as(tenant('alice')).volumes.get('m/tagged')).rejects.toMatchObject({ code: 'NotFound' });
    expect((await b.volumes.resize('m/tagged', 2 << 20)).owner).toBe('admin');
  });

  it('an administrator\'s create over a tenant\'s record of a volume that is not there removes the record', async () => {
    const { b, store } = await broker();
    await store.setOwner('m/v', 'carol'); // left by a broker killed between deleting the volume and its record
    expect((await b.volumes.create('m/v', { sizeBytes: 1 << 20 })).owner).toBe('admin');
    expect(await store.getOwner('m/v')).toBeUndefined();
    await expect(b.as(tenant('carol')).volumes.get('m/v')).rejects.toMatchObject({ code: 'NotFound' });
  });
});
