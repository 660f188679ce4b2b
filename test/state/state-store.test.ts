/**
 * Both StateStores pass the one contract (state-store.contract.ts): SQLite (two stores on one
 * file) and PostgreSQL (two stores on one database of a throwaway cluster, one cluster for this
 * file, one database per suite). Then what only PostgreSQL has: URLs that fail, typed and without
 * their password, and brokers that create the schema at the same moment.
 */
import Database from 'better-sqlite3';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isOffloadError } from '../../core/model/errors.js';
import { openPostgresStore } from '../../core/state/postgres/postgres-store.js';
import { SCHEMA_VERSION } from '../../core/state/postgres/schema.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';
import { postgresAvailable, postgresUrl, startPostgres, type Postgres } from '../support/postgres.js';
import { describeStateStore } from './state-store.contract.js';

describeStateStore('sqlite', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'offload-state-'));
  const file = join(dir, 'state.sqlite');
  const a = new SqliteStateStore(file);
  const b = new SqliteStateStore(file);
  const pragma = <T>(fn: (db: Database.Database) => T): T => {
    const db = new Database(file);
    try {
      return fn(db);
    } finally {
      db.close();
    }
  };
  return {
    a,
    b,
    another: async () => new SqliteStateStore(file),
    schemaVersion: async () => pragma((db) => db.pragma('user_version', { simple: true }) as number),
    setSchemaVersion: async (v) => pragma((db) => void db.pragma(`user_version = ${Math.trunc(v)}`)),
    async close() {
      await Promise.all([a.close(), b.close()]);
      rmSync(dir, { recursive: true, force: true });
    },
  };
});

describe('SQLite store errors', () => {
  it('a database another connection keeps locked past the busy timeout is Busy, typed, and the store goes on afterwards', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'offload-state-busy-'));
    const file = join(dir, 'state.sqlite');
    const store = new SqliteStateStore(file, { busyTimeoutMs: 300 });
    const other = new Database(file);
    try {
      other.exec('BEGIN IMMEDIATE');
      await expect(store.setOwner('local/v', 'alice')).rejects.toMatchObject({ code: 'Busy', message: expect.stringMatching(/stayed locked by another process/) });
      await expect(store.transaction('locks', async (tx) => tx.setOwner('local/v', 'alice'))).rejects.toMatchObject({ code: 'Busy' });
      other.exec('ROLLBACK');
      await store.setOwner('local/v', 'alice');
      expect(await store.getOwner('local/v')).toBe('alice');
    } finally {
      other.close();
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

/** Run one statement on a database as the superuser. */
async function sql<R extends pg.QueryResultRow>(url: string, text: string, params: unknown[] = []): Promise<R[]> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return (await c.query<R>(text, params)).rows;
  } finally {
    await c.end();
  }
}

describe.skipIf(!postgresAvailable())('PostgreSQL', () => {
  let server: Postgres;

  beforeAll(async () => {
    server = await startPostgres();
  });
  afterAll(async () => {
    await server?.stop();
  });

  describeStateStore('postgres', async () => {
    const url = await server.createDatabase();
    // Two brokers starting at once: both create (or find) the schema.
    const [a, b] = await Promise.all([openPostgresStore(url, { poolSize: 4 }), openPostgresStore(url, { poolSize: 4 })]);
    return {
      a,
      b,
      another: () => openPostgresStore(url, { poolSize: 1 }),
      schemaVersion: async () => (await sql<{ version: number }>(url, 'SELECT version FROM schema_version'))[0]!.version,
      setSchemaVersion: async (v) => void await sql(url, 'UPDATE schema_version SET version = $1', [v]),
      async close() {
        await Promise.all([a.close(), b.close()]);
      },
    };
  });

  describe('PostgreSQL only', () => {
    const PASSWORD = 'Hunter2:s3cr@t/pw';
    const inUrl = encodeURIComponent(PASSWORD);

    /** What openPostgresStore(url) rejects with, and how long it took. */
    async function failure(url: string): Promise<{ err: unknown; ms: number }> {
      const t = performance.now();
      const err = await openPostgresStore(url).then(async (s) => {
        await s.close();
        return new Error(`opened ${url}`);
      }, (e: unknown) => e);
      return { err, ms: performance.now() - t };
    }

    function expectNoPassword(err: unknown): void {
      const text = `${String(err)} ${(err as { hint?: string }).hint ?? ''} ${(err as { ref?: string }).ref ?? ''} ${JSON.stringify(err)}`;
      for (const p of [PASSWORD, inUrl, 'Hunter2', 's3cr']) expect(text).not.toContain(p);
    }

    it('no server at the socket: BackendUnavailable at once, naming the place but not the password', async () => {
      const missing = join(server.socketDir, 'no-such-dir');
      const { err, ms } = await failure(`postgres://postgres:${inUrl}@/offload?host=${encodeURIComponent(missing)}`);
      expect(isOffloadError(err, 'BackendUnavailable'), String(err)).toBe(true);
      expect((err as Error).message).toContain(missing);
      expect((err as Error).message).toContain('"offload"');
      expectNoPassword(err);
      expect(ms).toBeLessThan(3000);
    });

    it('no such database: FailedPrecondition, naming it but not the password', async () => {
      const url = `postgres://postgres:${inUrl}@/no_such_db?host=${encodeURIComponent(server.socketDir)}`;
      const { err, ms } = await failure(url);
      expect(isOffloadError(err, 'FailedPrecondition'), String(err)).toBe(true);
      expect((err as Error).message).toMatch(/"no_such_db".*no such database/);
      expect((err as { ref?: string }).ref).toBe(`postgres://postgres:***@/no_such_db?host=${encodeURIComponent(server.socketDir)}`);
      expectNoPassword(err);
      expect(ms).toBeLessThan(3000);
    });

    it('brokers starting at once on a new database create the schema once, and all open', async () => {
      const url = await server.createDatabase();
      const stores = await Promise.all(Array.from({ length: 6 }, () => openPostgresStore(url, { poolSize: 1 })));
      try {
        expect(await sql(url, 'SELECT version FROM schema_version')).toEqual([{ version: SCHEMA_VERSION }]);
        await stores[0]!.setOwner('pool/v', 'alice');
        expect(await stores[5]!.getOwner('pool/v')).toBe('alice');
      } finally {
        await Promise.all(stores.map((s) => s.close()));
      }
    });

    it('migrates a version 2 database (no lock-holder functions) to the current version, keeping its rows', async () => {
      const url = await server.createDatabase();
      const first = await openPostgresStore(url, { poolSize: 1 });
      await first.insertOpLocks({ id: 'op-old', locks: [{ key: 'pool/v', mode: 'exclusive' }], principal: 'p', role: 'admin', description: 'd', runnerPid: 1, runnerToken: 't', runnerHost: 'h', leaseExpires: 5 });
      await first.setOwner('pool/v', 'alice');
      await first.close();
      // As a build of schema 2 left it.
      await sql(url, 'DROP FUNCTION offload_claim_op_locks_owners(json, text[], text[]); DROP FUNCTION offload_lock_holders(text[], text[]); DROP FUNCTION offload_claim_op_locks_owners(json, text[]); DROP FUNCTION offload_claim_op_locks(json, text[]); DROP FUNCTION offload_lock_holders(text[]); DROP INDEX jobs_active; DROP INDEX op_locks_key; DROP INDEX op_locks_key_c; DROP TRIGGER jobs_job_locks ON jobs; DROP FUNCTION offload_job_locks(); DROP TABLE job_locks; DROP TABLE op_calls; UPDATE schema_version SET version = 2');
      // An active job of that version: the migration lists its locks (job_locks).
      await sql(url, `INSERT INTO jobs (id, type, status, executor, ref, owner, progress_current, progress_total, speed, params, runner_pid, runner_token, created_at, updated_at, locks)
        VALUES ('j-v2', 'copy', 'running', 'host', 'pool/t', 'admin', 0, 0, 0, '{}', 1, 't', 'x', 'x', '[{"key":"pool/t","mode":"exclusive"},{"key":"pool/v@b1","mode":"shared"}]')`);
      const s = await openPostgresStore(url, { poolSize: 1 });
      try {
        expect(SCHEMA_VERSION).toBe(8);
        expect(await sql(url, 'SELECT version FROM schema_version')).toEqual([{ version: 8 }]);
        const got = await s.claimOpLocks({ id: 'op-new', locks: [{ key: 'pool/v', mode: 'shared' }], principal: 'p', role: 'admin', description: 'd', runnerPid: 1, runnerToken: 't', runnerHost: 'h', leaseExpires: 6 });
        expect(got.ops.map((o) => o.id)).toEqual(['op-new', 'op-old']);
        expect((await s.lockHolders(['pool/t'])).jobs.map((j) => j.id)).toEqual(['j-v2']);
        expect((await s.lockHolders([], ['pool/v@'])).jobs.map((j) => j.id)).toEqual(['j-v2']);
        // Version 5: with their place in the order of claims (the old row first).
        expect(got.ops[1]!.seq!).toBeLessThan(got.ops[0]!.seq!);
        expect(got.owners).toEqual({ 'pool/v': 'alice' });
        // Version 6: the functions builds before it call refuse, naming the cause (they do not know its lock rules).
        for (const call of [`offload_claim_op_locks_owners('[]'::json, ARRAY['pool/v'])`, `offload_claim_op_locks('[]'::json, ARRAY['pool/v'])`, `offload_lock_holders(ARRAY['pool/v'])`]) {
          await expect(sql(url, `SELECT ${call}`)).rejects.toThrow(/newer build \(schema 6\).*restart this broker/);
        }
      } finally {
        await s.close();
      }
    });

    it.each(['SQL_ASCII', 'LATIN1'])('works in a database whose encoding is %s: lock checks by key and by prefix, claims', async (encoding) => {
      const name = `state_${encoding.toLowerCase()}`;
      await sql(server.url, `CREATE DATABASE ${name} ENCODING '${encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0`);
      const s = await openPostgresStore(postgresUrl(server.socketDir, name), { poolSize: 1 });
      try {
        await s.insertOpLocks({ id: 'op-1', locks: [{ key: 'm/v@s', mode: 'shared' }], principal: 'p', role: 'admin', description: 'd', runnerPid: 1, runnerToken: 't', runnerHost: 'h', leaseExpires: 5 });
        expect((await s.lockHolders(['m/w'], ['m/v@'])).ops.map((o) => o.id)).toEqual(['op-1']);
        const got = await s.claimOpLocks({ id: 'op-2', locks: [{ key: 'm/v', mode: 'exclusive' }], principal: 'p', role: 'admin', description: 'd', runnerPid: 1, runnerToken: 't', runnerHost: 'h', leaseExpires: 6 }, { prefixes: ['m/v@'] });
        expect(got.ops.map((o) => o.id)).toEqual(['op-1', 'op-2']);
      } finally {
        await s.close();
      }
    });

    it('sorts bytewise (as SQLite does) in a database whose collation does not, and keeps ms, sizes and fences in BIGINT', async (ctx) => {
      const name = 'state_icu';
      try {
        await sql(server.url, `CREATE DATABASE ${name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'`);
      } catch (e) {
        ctx.skip(`no ICU collation here: ${String(e)}`);
      }
      const url = postgresUrl(server.socketDir, name);
      const s = await openPostgresStore(url, { poolSize: 1 });
      try {
        const ids = ['b', 'B', '_a', 'a-1', 'a1'];
        const icu = (await sql<{ id: string }>(url, `SELECT unnest($1::text[]) AS id ORDER BY 1`, [ids])).map((r) => r.id);
        const bytewise = [...ids].sort();
        expect(icu).not.toEqual(bytewise); // else this database proves nothing
        for (const id of ids) {
          await s.insertJob({
            id, type: 't', status: 'running', executor: 'host', ref: 'r', owner: 'o', progress: { current: 0, total: 0 }, speed: 0, cancelled: false,
            createdAt: '2026-01-01T00:00:00.000Z', updatedAt: '2026-01-01T00:00:00.000Z', params: {}, runnerPid: 1, runnerToken: 't', runnerHost: 'h',
            leaseExpires: 0, seenAt: 0, fence: 0, locks: [], ownerRole: 'admin',
          });
          await s.placeMaintenance(id, 'p', 'r');
          await s.insertOpLocks({ id, locks: [{ key: id, mode: 'shared' }], principal: 'p', role: 'admin', description: '', runnerPid: 1, runnerToken: 't', runnerHost: 'h', leaseExpires: 0 });
        }
        expect((await s.listJobs()).map((j) => j.id)).toEqual(bytewise);
        expect((await s.listMaintenance()).map((m) => m.key)).toEqual(bytewise);
        expect((await s.listOpLocks()).map((o) => o.id)).toEqual(bytewise);
        const types = await sql<{ column_name: string; data_type: string }>(url,
          `SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'jobs'
             AND column_name IN ('progress_current', 'progress_total', 'speed', 'lease_expires', 'seen_at', 'fence')`);
        expect(types.map((t) => t.data_type)).toEqual(Array(6).fill('bigint'));
      } finally {
        await s.close();
      }
    });
  });
});
