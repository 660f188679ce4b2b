import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createBroker, silentLogger, tenant, type Broker } from '../../core/index.js';
import { memoryBackends, memoryModule } from '../support/memory-backend.js';

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function make(backends: Record<string, unknown>[]): Promise<Broker> {
  const state = mkdtempSync(join(tmpdir(), 'offload-broker-'));
  const b = await createBroker({ state, backends: backends as never }, { plugins: [memoryModule], logger: silentLogger });
  cleanups.push(() => rmSync(state, { recursive: true, force: true }));
  cleanups.push(() => b.close());
  return b;
}

const fill = (n: number, v: number) => new Uint8Array(n).fill(v);

describe('broker', () => {
  it('an operation a backend cannot do is Unsupported with the reason, and plan() explains it', async () => {
    const b = await make([{ name: 'lite', kind: 'memory', capabilities: ['volume.create', 'volume.list', 'volume.delete'] }]);
    await b.volumes.create('lite/a', { sizeBytes: 1 << 20 });
    await expect(b.snapshots.create('lite/a@s')).rejects.toMatchObject({ code: 'Unsupported', message: expect.stringMatching(/lite \(memory\) does not support snapshot\.create/) });
    await expect(b.stream('lite/a')).rejects.toMatchObject({ code: 'Unsupported' });
    const plan = await b.plan({ op: 'stream', ref: 'lite/a' });
    expect(plan).toMatchObject({ supported: false, steps: [], reason: expect.stringMatching(/does not support chain\.stream/) });
    const clonePlan = await b.plan({ op: 'clone', source: 'lite/a', target: 'lite/b' });
    expect(clonePlan.supported).toBe(false);
    expect(clonePlan.reason).toMatch(/no data\.read/);
    await expect(b.clone('lite/a', 'lite/b')).rejects.toMatchObject({ code: 'Unsupported' });
  });

  it('plan() shows native execution and its reason', async () => {
    const b = await make([{ name: 'm', kind: 'memory' }]);
    expect(await b.plan({ op: 'clone', source: 'm/a@s', target: 'm/b' })).toMatchObject({
      supported: true, steps: [{ action: 'clone.linked', executor: 'backend:m', hostBytes: 0 }],
    });
    expect(await b.plan({ op: 'clone', source: 'm/a', target: 'm/b', mode: 'full' })).toMatchObject({ steps: [{ action: 'clone.full' }] });
    await expect(b.plan({ op: 'clone', source: 'nowhere/a', target: 'm/b' })).rejects.toMatchObject({ code: 'NotFound' });
    await expect(b.plan({ op: 'stream', ref: 'm/bad name' })).rejects.toMatchObject({ code: 'InvalidArgument' });
  });

  it('clones across backends through the host data mover, moving only allocated data', async () => {
    const b = await make([{ name: 'a', kind: 'memory' }, { name: 'z', kind: 'memory' }]);
    await b.volumes.create('a/src', { sizeBytes: 64 << 20 });
    const dev = await b.volumes.open('a/src', 'rw');
    await dev.write(0, fill(8192, 1));
    await dev.write(32 << 20, fill(4096, 2));
    await dev.close();
    const plan = await b.plan({ op: 'clone', source: 'a/src', target: 'z/dst' });
    expect(plan.steps.map((s) => s.executor)).toEqual(['backend:z', 'host']);
    await expect(b.plan({ op: 'clone', source: 'a/src', target: 'z/dst', mode: 'linked' })).resolves.toMatchObject({ supported: false });
    const vol = await b.clone('a/src', 'z/dst');
    expect(vol.sizeBytes).toBe(64 << 20);
    const out = await b.volumes.open('z/dst', 'r');
    expect(Buffer.from(await out.read(0, 8192)).equals(Buffer.from(fill(8192, 1)))).toBe(true);
    expect(Buffer.from(await out.read(32 << 20, 4096)).equals(Buffer.from(fill(4096, 2)))).toBe(true);
    expect((await out.extents()).reduce((n, e) => n + e.length, 0)).toBe(8192 + 4096);
    await out.close();
    const jobs = (await b.jobs.list());
    expect(jobs).toHaveLength(1);
    // A clone through the host is a job of its own (it created the target, and would delete it on failure).
    expect(jobs[0]).toMatchObject({ type: 'clone', executor: 'host', progress: { current: 12288, total: 12288 } });
  });

  it('copy into an existing volume zeroes what the source does not hold; a smaller target is OutOfRange', async () => {
    const b = await make([{ name: 'a', kind: 'memory' }, { name: 'z', kind: 'memory' }]);
    await b.volumes.create('a/src', { sizeBytes: 1 << 20 });
    await b.volumes.create('z/dst', { sizeBytes: 1 << 20 });
    await b.volumes.create('z/small', { sizeBytes: 4096 });
    const d = await b.volumes.open('z/dst', 'rw');
    await d.write(0, fill(4096, 9));
    await d.close();
    const job = await b.copy('a/src', 'z/dst');
    expect((await job.wait()).error).toBeUndefined();
    const r = await b.volumes.open('z/dst', 'r');
    expect((await r.read(0, 4096)).every((x) => x === 0)).toBe(true);
    await r.close();
    await expect(b.copy('a/src', 'z/small')).rejects.toMatchObject({ code: 'OutOfRange' });
  });

  it('refuses a delete while a job holds the volume, naming the job', async () => {
    const b = await make([{ name: 'm', kind: 'memory', streamDelayMs: 20 }]);
    await b.volumes.create('m/base', { sizeBytes: 1 << 20 });
    const dev = await b.volumes.open('m/base', 'rw');
    await dev.write(0, fill(64 * 1024, 3));
    await dev.close();
    await b.snapshots.create('m/base@s');
    await b.clone('m/base@s', 'm/kid', { mode: 'linked' });
    const job = await b.stream('m/kid');
    await expect(b.volumes.delete('m/kid')).rejects.toMatchObject({ code: 'Busy', message: expect.stringContaining(job.id) });
    await expect(b.volumes.resize('m/kid', 2 << 20)).rejects.toMatchObject({ code: 'Busy' });
    await job.wait();
    await b.volumes.delete('m/kid');
  });

  it('nothing a tenant does blocks an administrator: deleting preempts the tenant\'s job', async () => {
    const admin = await make([{ name: 'm', kind: 'memory', streamDelayMs: 20 }]);
    const alice = admin.as(tenant('alice'));
    await alice.volumes.create('m/base', { sizeBytes: 1 << 20 });
    const dev = await alice.volumes.open('m/base', 'rw');
    await dev.write(0, fill(64 * 1024, 3));
    await dev.close();
    await alice.snapshots.create('m/base@s');
    await alice.clone('m/base@s', 'm/kid', { mode: 'linked' });
    const job = await alice.stream('m/kid');
    await admin.volumes.delete('m/kid');
    expect((await job.wait()).error?.code).toBe('Cancelled');
    await expect(admin.volumes.get('m/kid')).rejects.toMatchObject({ code: 'NotFound' });
  });

  it('maintenance locks: administrators only; tenants are refused while it stands', async () => {
    const admin = await make([{ name: 'm', kind: 'memory' }]);
    const alice = admin.as(tenant('alice'));
    await alice.volumes.create('m/v', { sizeBytes: 1 << 20 });
    await expect(alice.locks.maintenance('m/v', 'mine')).rejects.toThrow(expect.objectContaining({ code: 'PermissionDenied' }));
    await admin.locks.maintenance('m/v', 'moving to new shelf');
    await expect(alice.volumes.resize('m/v', 2 << 20)).rejects.toMatchObject({ code: 'Busy', message: expect.stringMatching(/new shelf/) });
    await admin.volumes.resize('m/v', 2 << 20);
    expect((await admin.locks.list())).toHaveLength(1);
    await expect(alice.locks.release('m/v')).rejects.toThrow(expect.objectContaining({ code: 'PermissionDenied' }));
    await admin.locks.release('m/v');
    await alice.volumes.resize('m/v', 3 << 20);
  });

  it('tenants act only on their own volumes', async () => {
    const admin = await make([{ name: 'm', kind: 'memory' }]);
    const alice = admin.as(tenant('alice'));
    const bob = admin.as(tenant('bob'));
    await alice.volumes.create('m/a', { sizeBytes: 1 << 20 });
    await expect(alice.volumes.create('m/x', { sizeBytes: 1 << 20, owner: 'bob' })).rejects.toMatchObject({ code: 'PermissionDenied' });
    await expect(bob.volumes.get('m/a')).rejects.toMatchObject({ code: 'NotFound' });
    await expect(bob.volumes.resize('m/a', 2 << 20)).rejects.toMatchObject({ code: 'NotFound' });
    await expect(bob.snapshots.create('m/a@s')).rejects.toMatchObject({ code: 'NotFound' });
    await expect(bob.clone('m/a', 'm/steal')).rejects.toMatchObject({ code: 'NotFound' });
    expect((await bob.volumes.listAll('m')).map((v) => v.name)).toEqual([]);
    await bob.volumes.delete('m/a'); // as if gone for bob; nothing changes
    expect((await alice.volumes.get('m/a')).owner).toBe('alice');
    expect((await admin.volumes.listAll('m')).map((v) => v.name)).toEqual(['a']);
  });

  it('an unknown backend is NotFound; a closed broker refuses work', async () => {
    const b = await make([{ name: 'm', kind: 'memory' }]);
    await expect(b.volumes.create('nope/v', { sizeBytes: 1 })).rejects.toMatchObject({ code: 'NotFound', hint: expect.stringMatching(/configured backends: m/) });
    await b.close();
    await expect(b.volumes.create('m/v', { sizeBytes: 1 })).rejects.toMatchObject({ code: 'FailedPrecondition' });
  });

  it('linked clones are instant: no data is copied', async () => {
    const b = await make([{ name: 'inst', kind: 'memory' }]);
    await b.volumes.create('inst/big', { sizeBytes: 16 * 2 ** 30 });
    const dev = await b.volumes.open('inst/big', 'rw');
    await dev.write(0, fill(1 << 20, 5));
    await dev.close();
    await b.snapshots.create('inst/big@s');
    await b.clone('inst/big@s', 'inst/kid', { mode: 'linked' });
    expect(memoryBackends.get('inst')!.bytesCopied).toBe(0);
  });

  it('no one takes over a volume through an idempotent create or clone', async () => {
    const admin = await make([{ name: 'm', kind: 'memory' }]);
    const a = admin.as(tenant('a'));
    const b = admin.as(tenant('b'));
    await b.volumes.create('m/bvol', { sizeBytes: 1 << 20 });
    await a.volumes.create('m/avol', { sizeBytes: 1 << 20 });
    await expect(a.volumes.create('m/bvol', { sizeBytes: 1 << 20 })).rejects.toMatchObject({ code: 'AlreadyExists' });
    await expect(a.clone('m/avol', 'm/bvol', { mode: 'full' })).rejects.toMatchObject({ code: 'AlreadyExists' });
    // an administrator's "make sure it exists" keeps the owner
    expect((await admin.volumes.create('m/bvol', { sizeBytes: 1 << 20 })).owner).toBe('b');
    expect((await b.volumes.get('m/bvol')).owner).toBe('b');
    // a volume made by the administrator cannot be claimed by a tenant
    await admin.volumes.create('m/infra', { sizeBytes: 1 << 20 });
    await expect(a.volumes.create('m/infra', { sizeBytes: 1 << 20 })).rejects.toMatchObject({ code: 'AlreadyExists' });
  });

  it('a clone through the host refuses an existing target and leaves nothing behind when the copy fails', async () => {
    const b = await make([{ name: 'a', kind: 'memory' }, { name: 'z', kind: 'memory' }]);
    await b.volumes.create('a/src', { sizeBytes: 1 << 20 });
    await b.volumes.create('z/keep', { sizeBytes: 1 << 20 });
    const d = await b.volumes.open('z/keep', 'rw');
    await d.write(0, fill(4096, 9));
    await d.close();
    await expect(b.clone('a/src', 'z/keep')).rejects.toMatchObject({ code: 'AlreadyExists' });
    const r = await b.volumes.open('z/keep', 'r');
    expect((await r.read(0, 4096))[0]).toBe(9);
    await r.close();
    // make the copy fail: the source disappears under it
    const src = memoryBackends.get('a')!;
    const open = src.openVolume.bind(src);
    src.openVolume = async () => { throw new Error('source went away'); };
    await expect(b.clone('a/src', 'z/new')).rejects.toThrow(/source went away/);
    src.openVolume = open;
    await expect(b.volumes.get('z/new')).rejects.toMatchObject({ code: 'NotFound' });
  });
});
