/**
 * The throwaway PostgreSQL of test/support/postgres.ts, and what the state store will rely on:
 * separate databases, committed rows seen by every client, and row locks (SELECT … FOR UPDATE
 * blocks another until commit; NOWAIT and SKIP LOCKED do not wait).
 */
import { existsSync, readFileSync } from 'node:fs';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { postgresAvailable, startPostgres, type Postgres } from './postgres.js';

/** Whether a process runs (a zombie waiting for init to reap it does not). */
function running(pid: number): boolean {
  if (!existsSync('/proc/self')) {
    try { process.kill(pid, 0); return true; } catch (e) { return (e as NodeJS.ErrnoException).code === 'EPERM'; }
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z';
  } catch {
    return false;
  }
}

describe.skipIf(!postgresAvailable())('a throwaway PostgreSQL cluster (test/support/postgres.ts)', () => {
  let server: Postgres;
  const clients: pg.Client[] = [];

  async function connect(url: string): Promise<pg.Client> {
    const c = new pg.Client({ connectionString: url });
    clients.push(c);
    await c.connect();
    return c;
  }

  beforeAll(async () => {
    const t = performance.now();
    server = await startPostgres();
    const ms = Math.round(performance.now() - t);
    process.stderr.write(`PostgreSQL ${server.version} started in ${ms} ms at ${server.socketDir}\n`);
  });

  afterAll(async () => {
    await Promise.all(clients.map((c) => c.end().catch(() => {})));
    await server?.stop();
  });

  it('listens on a unix socket in its own dir only, as superuser postgres with trust auth', async () => {
    expect(server.url).toBe(`postgres://postgres@/postgres?host=${encodeURIComponent(server.socketDir)}`);
    expect(existsSync(`${server.socketDir}/.s.PGSQL.5432`)).toBe(true);
    const c = await connect(server.url);
    const r = await c.query<{ user: string; listen: string; superuser: string }>(
      "SELECT current_user AS user, current_setting('listen_addresses') AS listen, current_setting('is_superuser') AS superuser");
    expect(r.rows[0]).toEqual({ user: 'postgres', listen: '', superuser: 'on' });
    expect(running(server.pid)).toBe(true);
  });

  it('creates separate databases: a table of one is not in the other', async () => {
    const a = await server.createDatabase('store_a');
    const b = await server.createDatabase();
    expect(a).toBe(`postgres://postgres@/store_a?host=${encodeURIComponent(server.socketDir)}`);
    expect(b).not.toBe(a);
    const ca = await connect(a);
    const cb = await connect(b);
    await ca.query('CREATE TABLE only_in_a (id int)');
    expect((await ca.query<{ db: string }>('SELECT current_database() AS db')).rows[0]!.db).toBe('store_a');
    await expect(cb.query('SELECT * FROM only_in_a')).rejects.toMatchObject({ code: '42P01' }); // undefined_table
    await expect(server.createDatabase('store_a')).rejects.toMatchObject({ code: '42P04' }); // duplicate_database
    await expect(server.createDatabase('no"quotes')).rejects.toThrow(/not a plain lower-case SQL name/);
  });

  describe('two clients of one database', () => {
    let one: pg.Client;
    let two: pg.Client;
    let observer: pg.Client;

    beforeAll(async () => {
      const url = await server.createDatabase('rows');
      [one, two, observer] = await Promise.all([connect(url), connect(url), connect(url)]);
      await one.query('CREATE TABLE volume (id text PRIMARY KEY, state text NOT NULL, generation int NOT NULL)');
    });

    it("see each other's committed rows, and not the uncommitted ones", async () => {
      await one.query('BEGIN');
      await one.query("INSERT INTO volume VALUES ('v1', 'creating', 1)");
      expect((await two.query('SELECT * FROM volume')).rows).toEqual([]);
      await one.query('COMMIT');
      expect((await two.query('SELECT * FROM volume')).rows).toEqual([{ id: 'v1', state: 'creating', generation: 1 }]);

      await two.query("INSERT INTO volume VALUES ('v2', 'ready', 1)");
      expect((await one.query('SELECT id FROM volume ORDER BY id')).rows.map((r: { id: string }) => r.id)).toEqual(['v1', 'v2']);
    });

    it('SELECT … FOR UPDATE in one transaction blocks another until the first commits, which then reads the new row', async () => {
      await one.query('BEGIN');
      await one.query("SELECT * FROM volume WHERE id = 'v1' FOR UPDATE");
      const twoPid = ((await two.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!).pid;

      await two.query('BEGIN');
      let done = false;
      const blocked = two.query<{ state: string; generation: number }>("SELECT state, generation FROM volume WHERE id = 'v1' FOR UPDATE")
        .finally(() => { done = true; });

      // Waiting on a lock, by the server's own account (not by a timer of ours).
      let waiting = '';
      for (let i = 0; i < 200 && waiting !== 'Lock'; i++) {
        const r = await observer.query<{ wait: string | null }>('SELECT wait_event_type AS wait FROM pg_stat_activity WHERE pid = $1', [twoPid]);
        waiting = r.rows[0]?.wait ?? '';
        if (waiting !== 'Lock') await new Promise((r) => setTimeout(r, 10));
      }
      expect(waiting).toBe('Lock');
      await new Promise((r) => setTimeout(r, 100));
      expect(done).toBe(false);

      // A reader that does not lock is not blocked.
      expect((await observer.query("SELECT state FROM volume WHERE id = 'v1'")).rows).toEqual([{ state: 'creating' }]);

      await one.query("UPDATE volume SET state = 'ready', generation = generation + 1 WHERE id = 'v1'");
      expect(done).toBe(false);
      await one.query('COMMIT');
      expect((await blocked).rows).toEqual([{ state: 'ready', generation: 2 }]);
      await two.query('COMMIT');
    });

    it('FOR UPDATE NOWAIT fails at once on a locked row, and SKIP LOCKED passes it by', async () => {
      await one.query('BEGIN');
      await one.query("SELECT * FROM volume WHERE id = 'v1' FOR UPDATE");
      await two.query('BEGIN');
      await expect(two.query("SELECT * FROM volume WHERE id = 'v1' FOR UPDATE NOWAIT")).rejects.toMatchObject({ code: '55P03' }); // lock_not_available
      await two.query('ROLLBACK');
      const free = await two.query<{ id: string }>('SELECT id FROM volume ORDER BY id FOR UPDATE SKIP LOCKED');
      expect(free.rows.map((r) => r.id)).toEqual(['v2']);
      await one.query('COMMIT');
    });
  });

  it('a failed start reports the server log, and leaves no server and no dir behind', async () => {
    const err = await startPostgres({ settings: { shared_buffers: 'lots' } }).then(() => undefined, (e: Error) => e);
    expect(err?.message).toMatch(/pg_ctl start .* exited/);
    expect(err?.message).toMatch(/server log[\s\S]*invalid value for parameter "shared_buffers": "lots"/);
    const dir = /server log \((\/[^)]*)\/server\.log\)/.exec(err!.message)?.[1];
    expect(dir).toBeDefined();
    expect(existsSync(dir!)).toBe(false);
  });

  it('stop() kills the server (and its clients) and removes its dir; it is idempotent', async () => {
    const other = await startPostgres({ settings: { max_connections: 10 } });
    const c = new pg.Client({ connectionString: await other.createDatabase() });
    c.on('error', () => {});
    await c.connect();
    expect(running(other.pid)).toBe(true);
    const backend = ((await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!).pid;
    await other.stop();
    await other.stop();
    expect(running(other.pid)).toBe(false);
    expect(running(backend)).toBe(false);
    expect(existsSync(other.socketDir)).toBe(false);
    await expect(c.query('SELECT 1')).rejects.toThrow();
    await c.end().catch(() => {});
  });
});
