/**
 * Three `offload serve` processes on three "hosts" sharing one PostgreSQL database (issue 15,
 * item 6): each with its own pool and the same two mock appliances, one-second leases, and a host
 * identity of its own (OFFLOAD_RUNNER_HOST), so that they judge each other by lease as services on
 * different machines do, never by pid. Jobs are submitted through the control API of any of them
 * (the CLI's client, connectBroker); takeovers and fencing rejections are read from each service's
 * /metrics, the jobs' runners and fencing tokens from the database.
 *
 * - kill -9 of the service running a host copy (FlashArray mock → ONTAP mock): another takes the
 *   job over once the lease expires (the next fencing token, one takeover), resumes it from the
 *   checkpoint (it reads about what was left, not everything), and the target equals the source.
 * - kill -9 of the service running an offloaded stream (an ONTAP clone split): another follows the
 *   same appliance job to its end; the appliance ran one split.
 * - a stream on one host's own pool, its service killed: no other host takes it (they do not
 *   configure that pool); the host's next service does, and finishes it.
 * - SIGSTOP of a service past its lease, SIGCONT after another finished its copy: the old runner
 *   learns it was fenced (its /metrics counts it) and writes nothing — the record keeps the new
 *   runner's fencing token, and the target keeps what the new runner left although the source changed.
 * - throughout: a watch samples the lock holders every 20 ms (no two runners ever hold conflicting
 *   locks on one key), and a trigger in the database records every conclusion (no job concludes
 *   twice, none changes after it concluded).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectBroker, createBroker, silentLogger, type Broker, type JobInfo, type RawConfig } from '../../core/index.js';
import { openPostgresStore } from '../../core/state/postgres/postgres-store.js';
import type { JobRecord } from '../../core/state/records.js';
import { startFlashArrayMock, type FlashArrayMock } from '../../plugins/flasharray/index.js';
import { builtinPlugins } from '../../plugins/index.js';
import { MOCK_DEFAULTS, startOntapMock, type OntapMock } from '../../plugins/ontap/index.js';
import pgLib from 'pg';
import { HAVE, qemuIo } from '../support/nbd-tools.js';
import { postgresAvailable, startPostgres, type Postgres } from '../support/postgres.js';
import { tsChild } from '../support/ts-child.js';

const ROOT = join(import.meta.dirname, '../..');
const MiB = 1024 * 1024;
const SIZE = 32 * MiB;

interface Host {
  name: string;
  child: ChildProcess;
  exited: Promise<number | null>;
  /** This service's control API, as the CLI's --server client. */
  api: Broker;
  /** Its takeover and fencing counters, from /metrics. */
  metrics(): Promise<{ takeovers: number; fenced: number }>;
}

describe.skipIf(!postgresAvailable())('brokers on three hosts, one PostgreSQL database', () => {
  let pg: Postgres;
  let san: FlashArrayMock;
  let nas: OntapMock;
  let dir: string;
  let url: string;
  let client: Broker;
  let monitor: ReturnType<typeof watchLocks> | undefined;
  const hosts: Host[] = [];

  const configOf = (name: string): RawConfig => ({
    state: url, stateDir: join(dir, name, 'state'), leaseSeconds: 1,
    backends: [
      { name: `pool-${name}`, kind: 'qcow2', path: join(dir, name, 'pool') },
      // The client also reaches host a's pool (another process on the same pool), to set it up.
      ...(name === 'client' ? [{ name: 'pool-a', kind: 'qcow2', path: join(dir, 'a', 'pool') }] : []),
      { name: 'san1', kind: 'flasharray', endpoint: san.url, apiToken: san.apiToken },
      { name: 'nas1', kind: 'ontap', endpoint: nas.url, username: nas.username, password: nas.password, svm: MOCK_DEFAULTS.svm, pollIntervalMs: 20, pollMaxIntervalMs: 100 },
    ],
  });

  beforeAll(async () => {
    pg = await startPostgres();
    url = await pg.createDatabase();
    san = await startFlashArrayMock({ port: 0 });
    nas = await startOntapMock({ port: 0, jobDurationMs: 20, splitBytesPerSecond: 8 * MiB });
    dir = mkdtempSync(join(tmpdir(), 'offload-multihost-'));
    for (const h of ['a', 'b', 'c', 'd', 'client']) mkdirSync(join(dir, h, 'pool'), { recursive: true });
    client = await createBroker(configOf('client'), { plugins: builtinPlugins, logger: silentLogger, recoverJobs: false });
    await installAudit();
    monitor = watchLocks();
  }, 60_000);

  afterAll(async () => {
    await monitor?.stop();
    for (const h of hosts) {
      h.child.kill('SIGKILL');
      await h.api.close().catch(() => undefined);
    }
    await client?.close();
    await Promise.allSettled([san?.close(), nas?.close()]);
    await pg?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  async function startHost(name: string): Promise<Host> {
    const file = join(dir, `${name}-${hosts.length}.json`);
    const socket = join(dir, `${name}-${hosts.length}.sock`);
    writeFileSync(file, JSON.stringify(configOf(name)));
    const child = spawn(process.execPath, [...tsChild('bin/main.ts'), '--config', file, 'serve', '--socket', socket], {
      cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, OFFLOAD_RUNNER_HOST: `host-${name}`, OFFLOAD_SERVER: '' },
    });
    const exited = new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
    await new Promise<void>((resolve, reject) => {
      createInterface({ input: child.stdout! }).once('line', () => resolve());
      void exited.then((c) => reject(new Error(`offload serve (${name}) exited ${c} before it was ready`)));
    });
    const api = await connectBroker(`unix:${socket}`);
    const metrics = async () => {
      const text = await new Promise<string>((resolve, reject) => {
        request({ socketPath: socket, path: '/metrics' }, (res) => {
          let t = '';
          res.setEncoding('utf8').on('data', (d: string) => { t += d; }).on('end', () => resolve(t));
        }).on('error', reject).end();
      });
      const value = (metric: string) => Number(new RegExp(`^${metric} (\\S+)$`, 'm').exec(text)?.[1] ?? 0);
      return { takeovers: value('offload_job_takeovers_total'), fenced: value('offload_job_fencing_rejections_total') };
    };
    const host: Host = { name, child, exited, api, metrics };
    hosts.push(host);
    return host;
  }

  /**
   * Every job's conclusion, and every change to a job after it concluded, recorded by a trigger in
   * the database (the test's own, beside the broker's tables): whoever writes, the database sees it.
   */
  async function installAudit(): Promise<void> {
    await sqlRows(`
      CREATE TABLE audit_conclusions (id TEXT NOT NULL, fence BIGINT NOT NULL, runner_host TEXT NOT NULL);
      CREATE TABLE audit_after_conclusion (id TEXT NOT NULL, change TEXT NOT NULL);
      CREATE FUNCTION audit_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF OLD.status = 'concluded' AND (NEW.status, NEW.progress_current, NEW.error_code, NEW.checkpoint, NEW.fence, NEW.runner_token)
            IS DISTINCT FROM (OLD.status, OLD.progress_current, OLD.error_code, OLD.checkpoint, OLD.fence, OLD.runner_token) THEN
          INSERT INTO audit_after_conclusion VALUES (NEW.id, format('%s fence %s -> %s, fence %s', OLD.status, OLD.fence, NEW.status, NEW.fence));
        END IF;
        IF NEW.status = 'concluded' AND OLD.status <> 'concluded' THEN
          INSERT INTO audit_conclusions VALUES (NEW.id, NEW.fence, NEW.runner_host);
        END IF;
        RETURN NEW;
      END $$;
      CREATE TRIGGER audit_jobs AFTER UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION audit_jobs();`);
  }

  async function sqlRows<R extends pgLib.QueryResultRow>(text: string, values?: unknown[]): Promise<R[]> {
    const db = new pgLib.Client({ connectionString: url });
    await db.connect();
    try {
      return (await db.query<R>(text, values)).rows;
    } finally {
      await db.end();
    }
  }

  /**
   * Samples the lock holders every 20 ms for the whole file: two jobs whose runners both hold a
   * live lease never hold conflicting locks on one key, nor does a job and an operation in two
   * samples running (an operation's claim that meets a job is withdrawn at once: seen in one at most).
   * A job's start claims its keys as an operation of its own id until its record holds them: under
   * load that overlap outlasted two samples (CI, 2026-12-06), and is no double hold.
   */
  function watchLocks(): { violations: string[]; samples: () => number; stop(): Promise<void> } {
    const violations: string[] = [];
    let samples = 0;
    let stopped = false;
    let lastJobOp = new Set<string>();
    const db = new pgLib.Client({ connectionString: url });
    const run = (async () => {
      await db.connect();
      while (!stopped) {
        const jobs = (await db.query<{ id: string; locks: string; runner_token: string; lease_expires: string }>(
          "SELECT id, locks, runner_token, lease_expires::text FROM jobs WHERE status <> 'concluded'")).rows;
        const ops = (await db.query<{ id: string; key: string; mode: string; lease_expires: string }>('SELECT id, key, mode, lease_expires::text FROM op_locks')).rows;
        const now = Date.now();
        const live = jobs.filter((j) => j.runner_token !== 'released' && Number(j.lease_expires) > now)
          .flatMap((j) => (JSON.parse(j.locks) as { key: string; mode: string }[]).map((l) => ({ holder: j.id, ...l })));
        const liveOps = ops.filter((o) => Number(o.lease_expires) > now).map((o) => ({ holder: o.id, key: o.key, mode: o.mode }));
        const conflict = (x: { mode: string }, y: { mode: string }) => !(x.mode === 'shared' && y.mode === 'shared');
        for (const [i, x] of live.entries()) {
          for (const y of live.slice(i + 1)) {
            if (x.holder !== y.holder && x.key === y.key && conflict(x, y)) violations.push(`jobs ${x.holder} and ${y.holder} both hold ${x.key}`);
          }
        }
        const jobOp = new Set<string>();
        // A job's own claim (its id) lasts from before its record until just after: the same holder, not two.
        for (const x of live) for (const y of liveOps) if (x.holder !== y.holder && x.key === y.key && conflict(x, y)) jobOp.add(`job ${x.holder} and operation ${y.holder} both hold ${x.key}`);
        for (const v of jobOp) if (lastJobOp.has(v)) violations.push(v);
        lastJobOp = jobOp;
        samples++;
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    return { violations, samples: () => samples, stop: async () => { stopped = true; await run.catch(() => undefined); await db.end().catch(() => undefined); } };
  }

  const alive = () => hosts.filter((h) => h.child.exitCode === null && h.child.signalCode === null);

  /** Takeovers counted by the live services. */
  async function takeovers(): Promise<number> {
    let n = 0;
    for (const h of alive()) n += (await h.metrics()).takeovers;
    return n;
  }

  async function info(id: string): Promise<JobInfo> {
    return (await client.jobs.get(id)).info();
  }

  async function until(what: string, ok: () => Promise<boolean>, ms = 60_000): Promise<void> {
    for (const end = Date.now() + ms; Date.now() < end;) {
      if (await ok()) return;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error(`timed out waiting for ${what}`);
  }

  async function sha(ref: string): Promise<string> {
    const dev = await client.volumes.open(ref, 'r');
    try {
      const h = createHash('sha256');
      const buf = Buffer.alloc(4 * MiB);
      for (let off = 0; off < SIZE; off += buf.length) h.update(await dev.read(off, buf.length));
      return h.digest('hex');
    } finally {
      await dev.close();
    }
  }

  async function fillVolume(ref: string, seed: number): Promise<void> {
    const dev = await client.volumes.open(ref, 'rw');
    try {
      for (let off = 0; off < SIZE; off += 4 * MiB) await dev.write(off, Buffer.alloc(4 * MiB, (seed + off / MiB) & 0xff));
      await dev.flush();
    } finally {
      await dev.close();
    }
  }

  /** Bytes a process has read (sockets included): what a host copy pulled from the source. */
  const rchar = (pid: number) => Number(/^rchar: (\d+)$/m.exec(readFileSync(`/proc/${pid}/io`, 'utf8'))![1]);

  /** BACKEND/kidN: a linked clone of BACKEND/baseN@s, whose base holds data of seed N (what a stream splits off). */
  async function linkedKid(backend: string, n: number): Promise<void> {
    await client.volumes.create(`${backend}/base${n}`, { sizeBytes: SIZE });
    await fillVolume(`${backend}/base${n}`, n);
    await client.snapshots.create(`${backend}/base${n}@s`);
    await client.clone(`${backend}/base${n}@s`, `${backend}/kid${n}`, { mode: 'linked' });
  }

  /** A job's fencing token and runner host as stored. */
  async function stored(id: string): Promise<{ fence: number; runner_host: string; status: string }> {
    const db = new pgLib.Client({ connectionString: url });
    await db.connect();
    try {
      return (await db.query<{ fence: number; runner_host: string; status: string }>('SELECT fence::int AS fence, runner_host, status FROM jobs WHERE id = $1', [id])).rows[0]!;
    } finally {
      await db.end();
    }
  }

  it('kill -9 of a service mid-copy: another takes the job over after the lease and finishes it from the checkpoint', async () => {
    await client.volumes.create('san1/src1', { sizeBytes: SIZE });
    await client.volumes.create('nas1/dst1', { sizeBytes: SIZE });
    await fillVolume('san1/src1', 1);
    const [a, b, c] = [await startHost('a'), await startHost('b'), await startHost('c')];
    // Submitted through service a's control API: a runs it.
    const id = (await a.api.copy('san1/src1', 'nas1/dst1', { speed: 8 * MiB })).id;
    await until('half the copy', async () => (await info(id)).progress.current >= SIZE / 2);
    expect(await stored(id)).toMatchObject({ runner_host: 'host-a', fence: 1 });
    const before = { b: rchar(b.child.pid!), c: rchar(c.child.pid!) };
    const counted = await takeovers();
    a.child.kill('SIGKILL');
    await a.exited;
    const atKill = (await info(id)).progress.current;

    // Followed through another service's API to its end.
    const done = await (await b.api.jobs.get(id)).wait();
    expect(done.error).toBeUndefined();
    const record = await stored(id);
    expect(record.fence).toBe(2);
    const taker = [b, c].find((h) => record.runner_host === `host-${h.name}`)!;
    expect(taker).toBeDefined();
    // One takeover; nobody lost the job to fencing.
    expect(await takeovers()).toBe(counted + 1);
    expect((await taker.metrics()).fenced).toBe(0);
    // Resumed, not restarted: the taker read about what was left of the source (and not all of it).
    const read = rchar(taker.child.pid!) - before[taker.name as 'b' | 'c'];
    expect(read).toBeGreaterThan((SIZE - atKill) / 2);
    expect(read).toBeLessThan(SIZE - atKill + 12 * MiB);
    expect(await sha('nas1/dst1')).toBe(await sha('san1/src1'));
  }, 120_000);

  it('kill -9 of a service mid-stream (an offloaded clone split): another follows the same appliance job to its end', async () => {
    await linkedKid('nas1', 2);
    const [d, e] = alive();
    const counted = await takeovers() - (await d!.metrics()).takeovers; // d's count dies with it
    const id = (await d!.api.stream('nas1/kid2')).id;
    await until('the split to run', async () => nas.appliance.allJobs().some((j) => j.state === 'running'));
    d!.child.kill('SIGKILL');
    await d!.exited;
    const done = await (await e!.api.jobs.get(id)).wait();
    expect(done.error).toBeUndefined();
    expect(await stored(id)).toMatchObject({ fence: 2, runner_host: `host-${e!.name}` });
    expect(await takeovers()).toBe(counted + 1);
    expect((await client.volumes.get('nas1/kid2')).parent).toBeUndefined();
    // The taker followed the split the first runner started: the appliance ran one.
    const kid = nas.appliance.allVolumes().find((v) => v.name === 'kid2')!;
    expect(nas.appliance.allJobs().filter((j) => j.kind === 'split' && j.volumeUuid === kid.uuid)).toHaveLength(1);
  }, 120_000);

  it('a job on a host\'s own pool is left to that host: the others never take it; its next service does', async () => {
    await linkedKid('pool-a', 4);
    const a = await startHost('a');
    const others = alive().filter((h) => h !== a);
    expect(others.length).toBeGreaterThan(0);
    const id = (await a.api.stream('pool-a/kid4', { speed: 8 * MiB })).id;
    await until('a quarter of the stream', async () => (await info(id)).progress.current >= SIZE / 4);
    const counted = await takeovers();
    a.child.kill('SIGKILL');
    await a.exited;
    await until('the job to be orphaned', async () => (await info(id)).orphaned === true);
    await new Promise((r) => setTimeout(r, 1500)); // the others look every third of the lease
    expect(await info(id)).toMatchObject({ status: 'running', orphaned: true });
    expect(await takeovers()).toBe(counted);
    const again = await startHost('a');
    const done = await (await again.api.jobs.get(id)).wait();
    expect(done.error).toBeUndefined();
    expect(await stored(id)).toMatchObject({ fence: 2, runner_host: 'host-a' });
    expect((await again.metrics()).takeovers).toBe(1);
    expect((await client.volumes.get('pool-a/kid4')).parent).toBeUndefined();
  }, 120_000);

  it('SIGSTOP of a service past its lease, SIGCONT after another finished its copy: the old runner is fenced and writes nothing', async () => {
    await client.volumes.create('san1/src3', { sizeBytes: SIZE });
    await client.volumes.create('nas1/dst3', { sizeBytes: SIZE });
    await fillVolume('san1/src3', 3);
    const f = await startHost('d');
    const id = (await f.api.copy('san1/src3', 'nas1/dst3', { speed: 8 * MiB })).id;
    await until('a quarter of the copy', async () => (await info(id)).progress.current >= SIZE / 4);
    const counted = await takeovers() - (await f.metrics()).takeovers;
    f.child.kill('SIGSTOP');
    try {
      await until('the copy to conclude under another runner', async () => (await info(id)).status === 'concluded');
      const done = await info(id);
      expect(done.error).toBeUndefined();
      const record = await stored(id);
      expect(record.fence).toBe(2);
      expect(record.runner_host).not.toBe('host-d');
      const copied = await sha('nas1/dst3');
      expect(copied).toBe(await sha('san1/src3'));
      // The source changes; were the old runner to copy on, the target would change with it.
      await fillVolume('san1/src3', 99);
      f.child.kill('SIGCONT');
      await until('the old runner to see it was fenced', async () => (await f.metrics()).fenced === 1);
      await new Promise((r) => setTimeout(r, 1500));
      expect(await sha('nas1/dst3')).toBe(copied);
      expect(await stored(id)).toEqual(record);
      expect(await takeovers() - (await f.metrics()).takeovers).toBe(counted + 1);
      expect(f.child.exitCode).toBeNull(); // it lives on, and only stopped that job
      expect((await f.api.volumes.get('san1/src3')).sizeBytes).toBe(SIZE); // and still answers
    } finally {
      f.child.kill('SIGCONT');
    }
  }, 120_000);

  it.skipIf(!HAVE.qemu)('a snapshot from another host of a disk a service exports read-write: asked of that service through PostgreSQL, taken within its export', async () => {
    await client.volumes.create('san1/inuse', { sizeBytes: 8 * MiB });
    const e = await startHost('a');
    const served = await e.api.exports.start('san1/inuse', { name: 'inuse', listen: { host: '127.0.0.1', port: 0 } });
    try {
      await qemuIo(served.uri, ['write -P 0x5a 0 1M']);
      expect((await client.snapshots.create('san1/inuse@s1')).name).toBe('s1'); // the client broker: another host's runner
      await qemuIo(served.uri, ['write -P 0x66 0 64k', 'read -P 0x5a 64k 960k']);
    } finally {
      await e.api.exports.stop('inuse');
      e.child.kill('SIGTERM');
    }
    // The snapshot holds the writes before it, not the one after.
    const snap = await client.exports.start('san1/inuse@s1', { name: 'inuse-s1', readOnly: true, listen: { host: '127.0.0.1', port: 0 } });
    try {
      await qemuIo(snap.uri, ['read -P 0x5a 0 1M'], { readOnly: true });
    } finally {
      await client.exports.stop('inuse-s1');
    }
  });

  it('throughout the cases above: no lock was held by two runners at once, and no job concluded twice or changed after it concluded', async () => {
    const m = monitor!;
    // The watch can see a conflict: two made-up jobs with live leases on one key, for a moment.
    const store = await openPostgresStore(url, { poolSize: 1 });
    const fake = (id: string): JobRecord => ({
      id, type: 'copy', status: 'running', executor: 'host', ref: 'san1/fake', owner: 'admin', progress: { current: 0, total: 1 }, speed: 0,
      cancelled: false, createdAt: new Date().toISOString(), updatedAt: new Date().toISOString(), params: {}, runnerPid: 1, runnerToken: `tok-${id}`,
      runnerHost: 'nowhere', leaseExpires: Date.now() + 60_000, seenAt: Date.now(), fence: 1, locks: [{ key: 'san1/fake', mode: 'exclusive' }], ownerRole: 'admin',
    });
    await store.insertJob(fake('fake-1'));
    await store.insertJob(fake('fake-2'));
    await until('the watch sees the made-up conflict', async () => m.violations.some((v) => v.includes('fake-1') && v.includes('fake-2')), 5000);
    await store.deleteJob('fake-1');
    await store.deleteJob('fake-2');
    await store.close();
    await m.stop();
    expect(m.samples()).toBeGreaterThan(100); // it watched the whole file, not a moment
    expect(m.violations.filter((v) => !v.includes('fake-'))).toEqual([]);
    const concluded = await sqlRows<{ id: string; n: number }>('SELECT id, count(*)::int AS n FROM audit_conclusions GROUP BY id');
    expect(concluded.length).toBeGreaterThanOrEqual(4); // one per case at least: the audit saw them
    expect(concluded.filter((c) => c.n !== 1)).toEqual([]);
    expect(await sqlRows('SELECT * FROM audit_after_conclusion')).toEqual([]);
    // Every job that concluded did so once, under the fencing token its record keeps.
    const jobs = await sqlRows<{ id: string; fence: string; audited: string }>(
      "SELECT j.id, j.fence::text, a.fence::text AS audited FROM jobs j JOIN audit_conclusions a ON a.id = j.id WHERE j.status = 'concluded'");
    expect(jobs.filter((j) => j.fence !== j.audited)).toEqual([]);
  });
});
