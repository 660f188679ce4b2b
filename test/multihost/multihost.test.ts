/**
 * Brokers on three "hosts" sharing one PostgreSQL database (issue 15, item 6): long-running
 * brokers in child processes (host-runner.ts), each with its own pool and the same two mock
 * appliances, one-second leases, and distinct host identities (OFFLOAD_RUNNER_HOST), so that they
 * judge each other by lease as brokers on different machines do, never by pid.
 *
 * - kill -9 of the runner of a host copy (FlashArray mock → ONTAP mock): another host takes the
 *   job over once the lease expires (the next fencing token, one takeover), resumes it from the
 *   checkpoint (it reads about what was left, not everything), and the target equals the source.
 * - kill -9 of the runner of an offloaded stream (an ONTAP clone split): another host follows the
 *   same appliance job to its end; the appliance ran one split.
 * - SIGSTOP of a runner past its lease, SIGCONT after another host finished its copy: the old
 *   runner learns it was fenced and writes nothing — the record keeps the new runner's fencing
 *   token, and the target keeps the data as the new runner left it although the source changed.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createBroker, silentLogger, type Broker, type JobInfo, type RawConfig } from '../../core/index.js';
import { startFlashArrayMock, type FlashArrayMock } from '../../plugins/flasharray/index.js';
import { builtinPlugins } from '../../plugins/index.js';
import { MOCK_DEFAULTS, startOntapMock, type OntapMock } from '../../plugins/ontap/index.js';
import { postgresAvailable, startPostgres, type Postgres } from '../support/postgres.js';

const ROOT = join(import.meta.dirname, '../..');
const MiB = 1024 * 1024;
const SIZE = 48 * MiB;

interface Host {
  name: string;
  child: ChildProcess;
  exited: Promise<number | null>;
  /** Every JSON line it printed so far. */
  lines: Record<string, unknown>[];
  /** Resolves with the first line that matches. */
  next(match: (l: Record<string, unknown>) => boolean): Promise<Record<string, unknown>>;
  send(command: string): void;
}

describe.skipIf(!postgresAvailable())('brokers on three hosts, one PostgreSQL database', () => {
  let pg: Postgres;
  let san: FlashArrayMock;
  let nas: OntapMock;
  let dir: string;
  let url: string;
  let client: Broker;
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
    for (const h of ['a', 'b', 'c', 'client']) mkdirSync(join(dir, h, 'pool'), { recursive: true });
    client = await createBroker(configOf('client'), { plugins: builtinPlugins, logger: silentLogger, recoverJobs: false });
  }, 60_000);

  afterAll(async () => {
    for (const h of hosts) h.child.kill('SIGKILL');
    await client?.close();
    await Promise.allSettled([san?.close(), nas?.close()]);
    await pg?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  async function startHost(name: string): Promise<Host> {
    const file = join(dir, `${name}-${hosts.length}.json`);
    writeFileSync(file, JSON.stringify(configOf(name)));
    const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'test/multihost/host-runner.ts'), file], {
      cwd: ROOT, stdio: ['pipe', 'pipe', 'inherit'], env: { ...process.env, OFFLOAD_RUNNER_HOST: `host-${name}` },
    });
    const lines: Record<string, unknown>[] = [];
    const waiters: { match: (l: Record<string, unknown>) => boolean; resolve: (l: Record<string, unknown>) => void }[] = [];
    let buf = '';
    child.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
        const l = JSON.parse(buf.slice(0, i)) as Record<string, unknown>;
        buf = buf.slice(i + 1);
        lines.push(l);
        for (const w of waiters.splice(0)) (w.match(l) ? w.resolve(l) : waiters.push(w));
      }
    });
    const exited = new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
    const host: Host = {
      name, child, exited, lines,
      next: (match) => {
        const seen = lines.find(match);
        if (seen) return Promise.resolve(seen);
        return new Promise((resolve, reject) => {
          waiters.push({ match, resolve });
          void exited.then((c) => reject(new Error(`host ${name} exited (${c}) before printing what was awaited`)));
        });
      },
      send: (command) => child.stdin!.write(`${command}\n`),
    };
    hosts.push(host);
    await host.next((l) => l.ready === true);
    return host;
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

  it('kill -9 of a host mid-copy: another host takes the job over after the lease and finishes it from the checkpoint', async () => {
    await client.volumes.create('san1/src1', { sizeBytes: SIZE });
    await client.volumes.create('nas1/dst1', { sizeBytes: SIZE });
    await fillVolume('san1/src1', 1);
    const [a, b, c] = [await startHost('a'), await startHost('b'), await startHost('c')];
    a.send(`copy san1/src1 nas1/dst1 ${8 * MiB}`);
    const id = (await a.next((l) => typeof l.job === 'string' || typeof l.error === 'string')).job as string;
    expect(id).toMatch(/^copy-/);
    await until('half the copy', async () => (await info(id)).progress.current >= SIZE / 2);
    expect((await info(id)).runner?.host).toBe('host-a');
    const before = { b: rchar(b.child.pid!), c: rchar(c.child.pid!) };
    a.child.kill('SIGKILL');
    await a.exited;
    const atKill = (await info(id)).progress.current;

    await until('the copy to conclude', async () => (await info(id)).status === 'concluded');
    const done = await info(id);
    expect(done.error).toBeUndefined();
    const taker = [b, c].find((h) => h.lines.some((l) => l.takeover === id))!;
    expect(taker).toBeDefined();
    expect(done.runner?.host).toBe(`host-${taker.name}`);
    // One takeover, with the next fencing token; nobody lost the job to fencing.
    expect([b, c].flatMap((h) => h.lines.filter((l) => l.takeover === id))).toEqual([{ takeover: id, fence: 2 }]);
    expect(hosts.flatMap((h) => h.lines.filter((l) => l.fenced === id))).toEqual([]);
    // Resumed, not restarted: the taker read about what was left of the source (and not all of it).
    const read = rchar(taker.child.pid!) - before[taker.name as 'b' | 'c'];
    expect(read).toBeGreaterThan((SIZE - atKill) / 2);
    expect(read).toBeLessThan(SIZE - atKill + 8 * MiB);
    expect(await sha('nas1/dst1')).toBe(await sha('san1/src1'));
  }, 120_000);

  it('kill -9 of a host mid-stream (an offloaded clone split): another host follows the same appliance job to its end', async () => {
    await client.volumes.create('nas1/base2', { sizeBytes: SIZE });
    await fillVolume('nas1/base2', 2);
    await client.snapshots.create('nas1/base2@s');
    await client.clone('nas1/base2@s', 'nas1/kid2', { mode: 'linked' });
    const running = hosts.filter((h) => h.child.exitCode === null && h.child.signalCode === null);
    const [d, e] = [running[0]!, running[1]!];
    d.send('stream nas1/kid2');
    const id = (await d.next((l) => typeof l.job === 'string' && (l.job as string).startsWith('stream-'))).job as string;
    await until('the split to run', async () => nas.appliance.allJobs().some((j) => j.state === 'running'));
    d.child.kill('SIGKILL');
    await d.exited;
    await until('the stream to conclude', async () => (await info(id)).status === 'concluded');
    const done = await info(id);
    expect(done.error).toBeUndefined();
    expect(e.lines.filter((l) => l.takeover === id)).toEqual([{ takeover: id, fence: 2 }]);
    expect((await client.volumes.get('nas1/kid2')).parent).toBeUndefined();
    // The taker followed the split the first runner started: the appliance ran one.
    const kid = nas.appliance.allVolumes().find((v) => v.name === 'kid2')!;
    expect(nas.appliance.allJobs().filter((j) => j.kind === 'split' && j.volumeUuid === kid.uuid)).toHaveLength(1);
  }, 120_000);

  it('a job on a host\'s own pool is left to that host: the others never take it; its next broker does', async () => {
    await client.volumes.create('pool-a/base4', { sizeBytes: SIZE });
    await fillVolume('pool-a/base4', 4);
    await client.snapshots.create('pool-a/base4@s');
    await client.clone('pool-a/base4@s', 'pool-a/kid4', { mode: 'linked' });
    const a = await startHost('a');
    const others = hosts.filter((h) => h !== a && h.child.exitCode === null && h.child.signalCode === null);
    expect(others.length).toBeGreaterThan(0);
    a.send(`stream pool-a/kid4 ${8 * MiB}`);
    const id = (await a.next((l) => typeof l.job === 'string' && (l.job as string).startsWith('stream-'))).job as string;
    await until('a quarter of the stream', async () => (await info(id)).progress.current >= SIZE / 4);
    a.child.kill('SIGKILL');
    await a.exited;
    await until('the job to be orphaned', async () => (await info(id)).orphaned === true);
    await new Promise((r) => setTimeout(r, 1500)); // the others scan every 100 ms
    expect(await info(id)).toMatchObject({ status: 'running', orphaned: true });
    expect(others.flatMap((h) => h.lines.filter((l) => l.takeover === id))).toEqual([]);
    const again = await startHost('a');
    await until('the stream to conclude', async () => (await info(id)).status === 'concluded');
    expect((await info(id)).error).toBeUndefined();
    expect(again.lines.filter((l) => l.takeover === id)).toEqual([{ takeover: id, fence: 2 }]);
    expect((await client.volumes.get('pool-a/kid4')).parent).toBeUndefined();
  }, 120_000);

  it('SIGSTOP of a host past its lease, SIGCONT after another finished its copy: the old runner is fenced and writes nothing', async () => {
    await client.volumes.create('san1/src3', { sizeBytes: SIZE });
    await client.volumes.create('nas1/dst3', { sizeBytes: SIZE });
    await fillVolume('san1/src3', 3);
    const [f, g] = [await startHost('a'), await startHost('b')];
    f.send(`copy san1/src3 nas1/dst3 ${8 * MiB}`);
    const id = (await f.next((l) => typeof l.job === 'string')).job as string;
    await until('a quarter of the copy', async () => (await info(id)).progress.current >= SIZE / 4);
    f.child.kill('SIGSTOP');
    try {
      await until('the copy to conclude under another runner', async () => (await info(id)).status === 'concluded');
      const done = await info(id);
      expect(done.error).toBeUndefined();
      expect(done.runner?.host).not.toBe('host-a');
      const copied = await sha('nas1/dst3');
      expect(copied).toBe(await sha('san1/src3'));
      // The source changes; were the old runner to copy on, the target would change with it.
      await fillVolume('san1/src3', 99);
      f.child.kill('SIGCONT');
      await f.next((l) => l.fenced === id);
      await new Promise((r) => setTimeout(r, 1500));
      expect(await sha('nas1/dst3')).toBe(copied);
      const after = await info(id);
      expect(after).toMatchObject({ status: 'concluded', runner: { host: done.runner?.host } });
      expect(g.lines.filter((l) => l.takeover === id).length + hosts.filter((h) => h !== f && h !== g).flatMap((h) => h.lines.filter((l) => l.takeover === id)).length).toBe(1);
      expect(f.child.exitCode).toBeNull(); // it lives on, and only stopped that job
    } finally {
      f.child.kill('SIGCONT');
    }
  }, 120_000);
});
