/**
 * The job store's leases and fencing tokens, and its schema migration: a takeover succeeds for
 * exactly one runner and hands out the next token; every write of an older token is refused.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it } from 'vitest';
import { JobStore, type JobRecord } from '../../core/jobs/job-store.js';

const dir = mkdtempSync(join(tmpdir(), 'offload-job-store-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function record(id: string): JobRecord {
  const now = new Date().toISOString();
  return {
    id, type: 'stream', status: 'running', executor: 'host', ref: 'local/kid', owner: 'admin', ownerRole: 'admin',
    progress: { current: 0, total: 100 }, speed: 0, cancelled: false, params: {}, createdAt: now, updatedAt: now,
    runnerPid: 111, runnerToken: 'runner-a', runnerHost: 'host-a', leaseExpires: Date.now() + 1000, seenAt: Date.now(), fence: 1, locks: [],
  };
}

const INDEXES = ['job_locks_job', 'job_locks_key', 'jobs_active', 'op_calls_op', 'op_locks_id', 'op_locks_key'];
const indexes = (db: Database.Database) => (db.prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%' ORDER BY name").all() as { name: string }[]).map((r) => r.name);

describe('JobStore leases and fencing', () => {
  it('a takeover wins once, with the next token; the old runner\'s writes and renewals are refused', () => {
    const a = new JobStore(join(dir, 'one.sqlite'));
    const b = new JobStore(join(dir, 'one.sqlite'));
    try {
      const rec = record('j1');
      a.insert(rec);
      const lease = rec.leaseExpires;
      const me = { pid: 222, token: 'runner-b', host: 'host-b' };
      expect(b.claim('j1', { token: 'runner-a', fence: 1, leaseExpires: lease }, me, Date.now() + 5000)).toBe(2);
      // A second taker with the same view of the record loses.
      expect(a.claim('j1', { token: 'runner-a', fence: 1, leaseExpires: lease }, { pid: 333, token: 'runner-c', host: 'host-c' }, Date.now() + 5000)).toBeUndefined();
      // The old runner: fenced out everywhere.
      rec.progress.current = 50;
      expect(a.update(rec)).toBe(false);
      expect(a.renew('j1', 'runner-a', 1, Date.now() + 5000)).toBe(false);
      expect(a.release('j1', 'runner-a', 1, { offset: 1 })).toBe(false);
      const now = b.get('j1')!;
      expect(now).toMatchObject({ runnerToken: 'runner-b', runnerHost: 'host-b', runnerPid: 222, fence: 2, progress: { current: 0 } });
      // The new one writes, renews and releases.
      now.progress.current = 60;
      expect(b.update(now)).toBe(true);
      expect(b.renew('j1', 'runner-b', 2, Date.now() + 9000)).toBe(true);
      expect(b.release('j1', 'runner-b', 2, { offset: 60 })).toBe(true);
      expect(a.get('j1')).toMatchObject({ runnerToken: 'released', runnerPid: 0, leaseExpires: 0, fence: 2, checkpoint: { offset: 60 }, progress: { current: 60 } });
      // A released job is taken over like any orphan, with the next token.
      expect(a.claim('j1', { token: 'released', fence: 2, leaseExpires: 0 }, { pid: 111, token: 'runner-a2', host: 'host-a' }, Date.now() + 5000)).toBe(3);
    } finally {
      a.close();
      b.close();
    }
  });

  it('a store written before leases is migrated when opened, its active jobs kept with a lease of grace', () => {
    const file = join(dir, 'old.sqlite');
    const db = new Database(file);
    db.exec(`CREATE TABLE jobs (id TEXT PRIMARY KEY, type TEXT NOT NULL, status TEXT NOT NULL, executor TEXT NOT NULL, backend TEXT,
      ref TEXT NOT NULL, owner TEXT NOT NULL, owner_role TEXT NOT NULL DEFAULT 'admin', progress_current INTEGER NOT NULL,
      progress_total INTEGER NOT NULL, speed INTEGER NOT NULL, error_code TEXT, error_message TEXT, cancelled INTEGER NOT NULL DEFAULT 0,
      params TEXT NOT NULL, plan TEXT, checkpoint TEXT, runner_pid INTEGER NOT NULL, runner_token TEXT NOT NULL, request TEXT,
      locks TEXT NOT NULL DEFAULT '[]', created_at TEXT NOT NULL, updated_at TEXT NOT NULL)`);
    db.prepare(`INSERT INTO jobs (id, type, status, executor, ref, owner, progress_current, progress_total, speed, params, checkpoint,
      runner_pid, runner_token, created_at, updated_at) VALUES ('old', 'stream', 'running', 'host', 'local/kid', 'admin', 5, 10, 0, '{}',
      '{"offset":5}', 999999, 'tok', 'x', 'x')`).run();
    db.close();
    const s = new JobStore(file);
    try {
      const old = s.get('old')!;
      // A lease's grace: the old build's runner may still be alive.
      expect(old).toMatchObject({ status: 'running', checkpoint: { offset: 5 }, runnerToken: 'tok', runnerHost: '', fence: 0 });
      expect(old.leaseExpires).toBeGreaterThan(Date.now() + 10_000);
      expect(s.claim('old', { token: 'tok', fence: 0, leaseExpires: old.leaseExpires }, { pid: 1, token: 'new', host: 'h' }, Date.now() + 1000)).toBe(1);
      expect(s.listExports()).toEqual([]);
    } finally {
      s.close();
    }
    const check = new Database(file, { readonly: true });
    expect(check.pragma('user_version', { simple: true })).toBe(6);
    expect(indexes(check)).toEqual(INDEXES);
    check.close();
  });

  it.each(['new', 'migrated'])('a %s store refuses the locks of an older build, which does not know this one\'s lock rules; its own go in', (kind) => {
    const file = join(dir, `${kind}-rules.sqlite`);
    if (kind === 'migrated') {
      new JobStore(file).close();
      const db = new Database(file); // as version 4 left it
      db.exec(`DROP TRIGGER op_locks_lock_rules; DROP TRIGGER jobs_lock_rules; ALTER TABLE op_locks DROP COLUMN lock_rules; ALTER TABLE jobs DROP COLUMN lock_rules;
        DROP TABLE job_locks; DROP TRIGGER jobs_locks_recorded; DROP TRIGGER jobs_locks_concluded; DROP TRIGGER jobs_locks_deleted`);
      db.pragma('user_version = 4');
      // An active job of that version: the migration lists its locks (job_locks).
      db.prepare(`INSERT INTO jobs (id, type, status, executor, ref, owner, progress_current, progress_total, speed, params, runner_pid, runner_token,
        created_at, updated_at, locks) VALUES ('j-v4', 'copy', 'running', 'host', 'm/t', 'admin', 0, 0, 0, '{}', 1, 't', 'x', 'x', '[{"key":"m/t","mode":"exclusive"},{"key":"m/v@b1","mode":"shared"}]')`).run();
      db.close();
    }
    const s = new JobStore(file);
    try {
      s.claimOpLocks({ id: 'op-new', locks: [{ key: 'm/v', mode: 'exclusive' }], principal: 'admin', role: 'admin', description: 'd', runnerPid: 1, runnerToken: 't', runnerHost: 'h', leaseExpires: 5 });
      s.insert(record('j-new'));
      const db = new Database(file);
      try {
        expect(db.pragma('user_version', { simple: true })).toBe(6);
        // An older build's statements, as 5868412 wrote them.
        expect(() => db.prepare(`INSERT INTO op_locks (id, key, mode, principal, role, description, runner_pid, runner_token, runner_host, lease_expires)
          VALUES ('op-old', 'm/v@b1', 'shared', 'admin', 'admin', 'backup', 1, 't', 'h', 5)`).run()).toThrow(/newer build.*restart this broker/);
        expect(() => db.prepare(`INSERT INTO jobs (id, type, status, executor, ref, owner, progress_current, progress_total, speed, params,
          runner_pid, runner_token, created_at, updated_at) VALUES ('j-old', 'backup', 'running', 'host', 'm/bk', 'admin', 0, 0, 0, '{}', 1, 't', 'x', 'x')`).run()).toThrow(/newer build/);
      } finally {
        db.close();
      }
      expect(s.listOpLocks().map((o) => o.id)).toEqual(['op-new']);
      expect(s.list().map((j) => j.id).sort()).toEqual(kind === 'migrated' ? ['j-new', 'j-v4'] : ['j-new']);
      if (kind === 'migrated') {
        expect(s.lockHolders(['m/t']).jobs.map((j) => j.id)).toEqual(['j-v4']);
        expect(s.lockHolders([], ['m/v@']).jobs.map((j) => j.id)).toEqual(['j-v4']);
      }
    } finally {
      s.close();
    }
  });

  it('a lock check of some keys reads them through indexes, in a new store as in a migrated one', () => {
    const s = new JobStore(join(dir, 'fresh.sqlite'));
    s.close();
    const db = new Database(join(dir, 'fresh.sqlite'), { readonly: true });
    try {
      expect(indexes(db)).toEqual(INDEXES);
      const plan = (sql: string) => (db.prepare(`EXPLAIN QUERY PLAN ${sql}`).all('["m/v"]') as { detail: string }[]).map((r) => r.detail).join('; ');
      expect(plan('SELECT * FROM op_locks WHERE id IN (SELECT id FROM op_locks WHERE key IN (SELECT value FROM json_each(?))) ORDER BY id, rowid')).toMatch(/op_locks_key/);
    } finally {
      db.close();
    }
  });

  it('refuses a store from a newer build', () => {
    const file = join(dir, 'new.sqlite');
    new JobStore(file).close();
    const db = new Database(file);
    db.pragma('user_version = 99');
    db.close();
    expect(() => new JobStore(file)).toThrow(/schema version 99, newer than this build knows/);
  });
});
