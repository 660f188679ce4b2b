/**
 * A long-running broker (adoptOrphans: what `offload serve` opens) dismisses concluded jobs older
 * than the config's jobRetentionDays (default 7) — at start, then hourly — as a user's dismissal
 * does (a crashed live copy's record it would vouch for goes first), but keeps a live copy that
 * can still be resumed, and never touches a job that has not concluded. jobRetentionDays: 0 keeps
 * them all; a CLI command (no adoptOrphans) never sweeps.
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createBroker, silentLogger, type JobRecord, type RawConfig } from '../../core/index.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';
import { builtinPlugins } from '../../plugins/index.js';
import { until } from '../service/service-helpers.js';

const dir = mkdtempSync(join(tmpdir(), 'offload-retention-'));
const config = (more: Partial<RawConfig> = {}): RawConfig => ({ state: join(dir, 'state'), ...more, backends: [{ name: 'local', kind: 'qcow2', path: join(dir, 'pool') }] });
let store: SqliteStateStore;

const LONG_AGO = '2020-01-01T00:00:00.000Z';
const mirror = { type: 'mirror', ref: 'local/a', params: { mode: 'copy', pairs: [{ source: 'local/a', target: 'local/b' }] } };

function record(id: string, updatedAt: string, over: Partial<JobRecord> = {}): JobRecord {
  return {
    id, type: 'copy', status: 'concluded', executor: 'host', ref: 'local/b', owner: 'admin', progress: { current: 1, total: 1 }, speed: 0,
    cancelled: false, createdAt: updatedAt, updatedAt, params: {}, runnerPid: 1, runnerToken: 'gone', runnerHost: 'elsewhere',
    leaseExpires: 0, seenAt: 0, fence: 1, locks: [], ownerRole: 'admin', ...over,
  };
}

const ids = async () => (await store.listJobs()).map((r) => r.id).sort();

beforeAll(async () => {
  mkdirSync(join(dir, 'pool'));
  mkdirSync(join(dir, 'state'));
  store = new SqliteStateStore(join(dir, 'state', 'jobs.sqlite'));
  const now = new Date().toISOString();
  await store.insertJob(record('old-copy', LONG_AGO));
  await store.insertJob(record('recent-copy', now));
  // Not concluded (another host runs it, its lease good for an hour): never swept, however old.
  await store.insertJob(record('old-running', LONG_AGO, { status: 'running', leaseExpires: Date.now() + 3_600_000, seenAt: Date.now() }));
  // A live copy suspended with its points, one resumed already, one whose service died.
  await store.insertJob(record('suspended-mirror', LONG_AGO, { ...mirror, checkpoint: { authoritative: 'source', points: ['offload-live-x'] } }));
  await store.insertJob(record('resumed-mirror', LONG_AGO, { ...mirror, checkpoint: { authoritative: 'source', points: ['offload-live-y'], resumedBy: 'mirror-next' } }));
  await store.insertJob(record('crashed-mirror', '2019-12-01T00:00:00.000Z', { ...mirror, checkpoint: { authoritative: 'source', intent: [{ regions: [[0, 1]] }] } }));
  // Cancelled: its record is no way on (a resume refuses it), whatever it holds.
  await store.insertJob(record('cancelled-mirror', LONG_AGO, { ...mirror, cancelled: true, checkpoint: { authoritative: 'source', intent: [{ regions: [[0, 1]] }] } }));
  // Wrote the crashed copy's target after it: its dismissal drops that copy's record.
  await store.insertJob(record('old-writer', LONG_AGO, { locks: [{ key: 'local/b', mode: 'exclusive' }] }));
  // Calls to an export: one answered a day and more ago, its asker gone without reading it; one just made.
  await store.insertOpLocks({ id: 'export:x#1', locks: [{ key: 'local/x', mode: 'exclusive' }], principal: 'admin', role: 'admin', description: 'nbd export',
    runnerPid: 1, runnerToken: 'gone', runnerHost: 'elsewhere', leaseExpires: Date.now() + 3_600_000 });
  for (const c of ['old-call', 'new-call']) await store.requestOpCall(c, 'export:x#1', '{}');
  await store.takeOpRequests(['export:x#1']);
  await store.answerOpCall('old-call', '{"ok":true}');
  const raw = new Database(join(dir, 'state', 'jobs.sqlite'));
  raw.prepare('UPDATE op_calls SET requested_at = ? WHERE id = ?').run(new Date(Date.now() - 25 * 3_600_000).toISOString(), 'old-call');
  raw.close();
});

afterAll(async () => {
  await store?.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('concluded jobs kept for jobRetentionDays', () => {
  it('jobRetentionDays is 0–3650 days', async () => {
    for (const bad of [-1, 4000, '7']) {
      await expect(createBroker(config({ jobRetentionDays: bad as number }), { plugins: builtinPlugins, logger: silentLogger, recoverJobs: false }))
        .rejects.toMatchObject({ code: 'InvalidArgument', message: expect.stringMatching(/^jobRetentionDays: /) });
    }
  });

  it('a CLI command and a service with jobRetentionDays: 0 sweep nothing', async () => {
    const before = await ids();
    const cli = await createBroker(config(), { plugins: builtinPlugins, logger: silentLogger, recoverJobs: false });
    const keeping = await createBroker(config({ jobRetentionDays: 0 }), { plugins: builtinPlugins, logger: silentLogger, adoptOrphans: { everyMs: 60_000 } });
    await keeping.jobs.list();
    await cli.close();
    await keeping.close();
    expect(await ids()).toEqual(before);
  });

  it('a service dismisses those older than 7 days, keeps the recent, the running and a live copy that can be resumed; a writer dismissed drops the crashed copy it wrote after', async () => {
    const service = await createBroker(config(), { plugins: builtinPlugins, logger: silentLogger, adoptOrphans: { everyMs: 60_000 } });
    try {
      await until('the old jobs dismissed', async () => !(await ids()).includes('old-writer'));
      expect(await ids()).toEqual(['crashed-mirror', 'old-running', 'recent-copy', 'suspended-mirror']);
      expect((await service.jobs.get('crashed-mirror')).info().crashed).toBeUndefined();
      // The call older than a day is gone with them; the new one stays for its answer.
      expect(await store.takeOpCallAnswer('old-call')).toBeNull();
      expect(await store.takeOpCallAnswer('new-call')).toBeUndefined();
    } finally {
      await service.close();
    }
    // Not a way on any more: the next sweep (here the next start's) dismisses it.
    const next = await createBroker(config(), { plugins: builtinPlugins, logger: silentLogger, adoptOrphans: { everyMs: 60_000 } });
    try {
      await until('the crashed copy dismissed', async () => !(await ids()).includes('crashed-mirror'));
      expect(await ids()).toEqual(['old-running', 'recent-copy', 'suspended-mirror']);
    } finally {
      await next.close();
    }
  });
});
