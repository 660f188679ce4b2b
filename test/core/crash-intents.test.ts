/**
 * A crashed live copy's write-intent record (a concluded mirror job's `intent`) is resumed from
 * only while the records say nothing wrote its volumes since (LiveCopies.assertUnchangedSince).
 * What would write them unseen drops it first: a job whose record goes (dismissed) that wrote
 * them after the copy, and a volume opened for writing through the API. test/live/live-crash.test.ts
 * runs the whole story against a killed service.
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createBroker, silentLogger, type Broker, type JobRecord } from '../../core/index.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';
import { builtinPlugins } from '../../plugins/index.js';

const dir = mkdtempSync(join(tmpdir(), 'offload-intents-'));
let broker: Broker;
let store: SqliteStateStore;

function record(id: string, createdAt: string, over: Partial<JobRecord>): JobRecord {
  return {
    id, type: 'copy', status: 'concluded', executor: 'host', ref: 'local/b', owner: 'admin', progress: { current: 1, total: 1 }, speed: 0,
    cancelled: false, createdAt, updatedAt: createdAt, params: {}, runnerPid: 1, runnerToken: 'gone', runnerHost: 'elsewhere',
    leaseExpires: 0, seenAt: 0, fence: 1, locks: [], ownerRole: 'admin', ...over,
  };
}

/** A live copy of local/a into local/b that died in its bulk pass, with its write-intent record. */
async function crashedCopy(id: string, createdAt: string): Promise<void> {
  await store.insertJob(record(id, createdAt, {
    type: 'mirror', ref: 'local/a', params: { mode: 'copy', pairs: [{ source: 'local/a', target: 'local/b' }] },
    checkpoint: { authoritative: 'source', intent: [{ regions: [[0, 1]] }] },
  }));
}

const crashed = async (id: string) => (await broker.jobs.get(id)).info().crashed === true;

beforeAll(async () => {
  mkdirSync(join(dir, 'pool'));
  broker = await createBroker({ state: join(dir, 'state'), backends: [{ name: 'local', kind: 'qcow2', path: join(dir, 'pool') }] }, { plugins: builtinPlugins, logger: silentLogger, recoverJobs: false });
  store = new SqliteStateStore(join(dir, 'state', 'jobs.sqlite'));
  for (const v of ['a', 'b']) await broker.volumes.create(`local/${v}`, { sizeBytes: 1 << 20 });
});

afterAll(async () => {
  await broker?.close();
  await store?.close();
  rmSync(dir, { recursive: true, force: true });
});

describe("a crashed live copy's write-intent record", () => {
  it('goes when a job that wrote one of its volumes after it is dismissed; not for a job before it, nor one that only read them', async () => {
    await crashedCopy('mirror-1', '2026-06-01T00:00:00.000Z');
    await store.insertJob(record('copy-before', '2026-05-01T00:00:00.000Z', { locks: [{ key: 'local/b', mode: 'exclusive' }] }));
    await store.insertJob(record('export-after', '2026-06-02T00:00:00.000Z', { ref: 'local/a', locks: [{ key: 'local/a', mode: 'shared' }] }));
    await store.insertJob(record('copy-after', '2026-06-03T00:00:00.000Z', { locks: [{ key: 'local/b', mode: 'exclusive' }] }));
    expect(await crashed('mirror-1')).toBe(true);
    await broker.jobs.dismiss('copy-before');
    await broker.jobs.dismiss('export-after');
    expect(await crashed('mirror-1')).toBe(true);
    await broker.jobs.dismiss('copy-after');
    expect(await crashed('mirror-1')).toBe(false);
    await expect(broker.jobs.get('copy-after')).rejects.toMatchObject({ code: 'NotFound' });
  });

  it("a job this broker ran, dismissed through its own handle, takes it too", async () => {
    const job = await broker.copy('local/a', 'local/b');
    await job.wait();
    // A copy that died before this job started (a record as its service left it).
    await crashedCopy('mirror-0', new Date(Date.parse(job.info().createdAt) - 1000).toISOString());
    expect(await crashed('mirror-0')).toBe(true);
    await job.dismiss();
    expect(await crashed('mirror-0')).toBe(false);
  });

  it('a later live copy of the same volumes dismissed takes it too', async () => {
    await crashedCopy('mirror-2', '2026-07-01T00:00:00.000Z');
    await store.insertJob(record('mirror-later', '2026-07-02T00:00:00.000Z', { type: 'mirror', ref: 'local/a', params: { mode: 'copy', pairs: [{ source: 'local/a', target: 'local/b' }] }, checkpoint: { authoritative: 'target' } }));
    await broker.jobs.dismiss('mirror-later');
    expect(await crashed('mirror-2')).toBe(false);
  });

  it('goes when one of its volumes is opened for writing through the API; not for reading', async () => {
    await crashedCopy('mirror-3', '2026-08-01T00:00:00.000Z');
    await (await broker.volumes.open('local/a', 'r')).close();
    expect(await crashed('mirror-3')).toBe(true);
    await (await broker.volumes.open('local/a', 'rw')).close();
    expect(await crashed('mirror-3')).toBe(false);
  });
});
