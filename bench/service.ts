/**
 * Issue 15 item 7's benchmark: what the broker's layers cost on control operations. N cycles
 * (OFFLOAD_BENCH_CYCLES, default 1000) of create volume + snapshot + delete snapshot + delete
 * volume on the FlashArray mock (its own process, `offload appliance flasharray`), each cycle one
 * volume name, one after another:
 *   (a) the plugin alone: the `flasharray` StorageBackend its factory makes, no broker;
 *   (b) the embedded broker (createBroker), state in SQLite, then in PostgreSQL;
 *   (c0) the plugin behind a bare Fastify server in another process (bench/plugin-hop.ts): no
 *        broker, only the process hop and the HTTP round trip — the floor of (c);
 *   (c) the control API on a unix socket (`offload serve`, the CLI's client), SQLite and PostgreSQL;
 * and the ratios to (a), the ways interleaved in blocks of 20 cycles. Goals: ≤ 1.2 embedded, ≤ 1.5 through the service;
 * (c) is also given over (c0), what the service adds to the bare hop. Then the time a job
 * takes to be taken over after its service is killed with SIGKILL (two `offload serve` on one
 * PostgreSQL database, lease 2 s): from the kill to the other service's takeover.
 *
 * PostgreSQL: a throwaway cluster (test/support/postgres.ts); skipped, with a note, without one.
 *
 *   npm run build && node --import tsx bench/service.ts
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { Agent, request } from 'node:http';
import { rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { connectBroker, createBroker, silentLogger, type Broker, type RawConfig, type StorageBackend } from '../core/index.js';
import { flasharrayFactory } from '../plugins/flasharray/index.js';
import { builtinPlugins } from '../plugins/index.js';
import { postgresAvailable, startPostgres, type Postgres } from '../test/support/postgres.js';
import { ROOT, median, workDir } from './harness.js';

const CYCLES = Number(process.env.OFFLOAD_BENCH_CYCLES ?? 1000);
const ROUNDS = Number(process.env.OFFLOAD_BENCH_ROUNDS ?? 3);
const dir = workDir('offload-bench-service-');

/** A line of JSON a child prints first (the mock's URL and token, a runner's readiness). */
function firstJson(child: ChildProcess): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      // One line (a runner), or one pretty-printed document (the CLI's --json).
      for (const text of [out.slice(0, Math.max(0, out.indexOf('\n'))), out]) {
        try {
          return resolve(JSON.parse(text) as Record<string, unknown>);
        } catch {
          // not complete yet
        }
      }
    });
    child.on('exit', (c) => reject(new Error(`child exited (${c}) before it was ready`)));
  });
}

/** The first line a child prints (`offload serve` prints its addresses once it is ready). */
function firstLine(child: ChildProcess): Promise<string> {
  return new Promise((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('\n')) resolve(out.slice(0, out.indexOf('\n')));
    });
    child.on('exit', (c) => reject(new Error(`child exited (${c}) before it was ready`)));
  });
}

const mock = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'bin/main.ts'), '--json', 'appliance', 'flasharray', '--port', '0'], { stdio: ['ignore', 'pipe', 'inherit'] });
const { url, apiToken } = (await firstJson(mock)) as { url: string; apiToken: string };
const san = { name: 'san1', kind: 'flasharray', endpoint: url, apiToken };

/** One cycle's four calls, through whatever `ops` is. */
interface Ops {
  create(name: string): Promise<unknown>;
  snapshot(name: string): Promise<unknown>;
  deleteSnapshot(name: string): Promise<unknown>;
  delete(name: string): Promise<unknown>;
}

/** ms for `n` cycles through `ops`, names made unique by `label`. */
async function cycles(label: string, ops: Ops, n: number): Promise<number> {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) {
    const name = `${label}-${i}`;
    await ops.create(name);
    await ops.snapshot(name);
    await ops.deleteSnapshot(name);
    await ops.delete(name);
  }
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

function viaBackend(b: StorageBackend): Ops {
  return {
    create: (n) => b.createVolume({ name: n, sizeBytes: 1 << 20 }),
    snapshot: (n) => b.createSnapshot(n, 's'),
    deleteSnapshot: (n) => b.deleteSnapshot(n, 's'),
    delete: (n) => b.deleteVolume(n),
  };
}

function viaBroker(b: Broker): Ops {
  return {
    create: (n) => b.volumes.create(`san1/${n}`, { sizeBytes: 1 << 20 }),
    snapshot: (n) => b.snapshots.create(`san1/${n}@s`),
    deleteSnapshot: (n) => b.snapshots.delete(`san1/${n}@s`),
    delete: (n) => b.volumes.delete(`san1/${n}`),
  };
}

let pg: Postgres | undefined;
const closers: (() => Promise<unknown> | unknown)[] = [];
try {
  const backend = await flasharrayFactory.create(flasharrayFactory.configSchema.parse(san), { stateDir: dir, baseDir: dir, logger: silentLogger });
  closers.push(() => backend.close?.());
  const ways: { what: string; ops: Ops }[] = [{ what: '(a) the plugin alone', ops: viaBackend(backend) }];

  const states: { name: string; state: string; stateDir?: string }[] = [{ name: 'SQLite', state: join(dir, 'sqlite') }];
  if (postgresAvailable()) {
    pg = await startPostgres();
    states.push({ name: 'PostgreSQL', state: await pg.createDatabase(), stateDir: join(dir, 'pg') });
  } else {
    process.stdout.write('PostgreSQL is not installed: its rows are skipped\n');
  }
  for (const s of states) {
    const config: RawConfig = { state: s.state, ...(s.stateDir ? { stateDir: s.stateDir } : {}), backends: [san] };
    const broker = await createBroker(config, { plugins: builtinPlugins, logger: silentLogger });
    closers.push(() => broker.close());
    ways.push({ what: `(b) embedded broker, ${s.name}`, ops: viaBroker(broker) });
  }
  {
    // The floor of (c): the plugin behind a bare Fastify server in a process of its own, no broker.
    const socket = join(dir, 'hop.sock');
    const hop = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'bench/plugin-hop.ts'), JSON.stringify(san), socket], { stdio: ['ignore', 'pipe', 'inherit'] });
    closers.push(() => hop.kill('SIGTERM'));
    await firstLine(hop);
    const agent = new Agent({ keepAlive: true });
    closers.push(() => agent.destroy());
    const call = (method: string, path: string) => new Promise<void>((resolve, reject) => {
      const req = request({ socketPath: socket, method, path, agent }, (res) => {
        res.resume();
        res.on('end', () => (res.statusCode! < 300 ? resolve() : reject(new Error(`${method} ${path}: ${res.statusCode}`))));
      });
      req.on('error', reject);
      req.end();
    });
    ways.push({
      what: '(c0) bare HTTP hop to the plugin',
      ops: { create: (n) => call('PUT', `/v/${n}`), snapshot: (n) => call('PUT', `/s/${n}`), deleteSnapshot: (n) => call('DELETE', `/s/${n}`), delete: (n) => call('DELETE', `/v/${n}`) },
    });
  }
  for (const s of states) {
    // The service: `offload serve` in a process of its own, its control API on a unix socket.
    const file = join(dir, `serve-${s.name}.json`);
    const socket = join(dir, `serve-${s.name}.sock`);
    writeFileSync(file, JSON.stringify({ state: s.state, ...(s.stateDir ? { stateDir: `${s.stateDir}-serve` } : { state: `${s.state}-serve` }), backends: [san] }));
    const service = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'bin/main.ts'), '--config', file, 'serve', '--socket', socket], { stdio: ['ignore', 'pipe', 'inherit'] });
    closers.push(() => service.kill('SIGTERM'));
    await firstLine(service);
    const client = await connectBroker(`unix:${socket}`);
    closers.unshift(() => client.close());
    ways.push({ what: `(c) the service, unix socket, ${s.name}`, ops: viaBroker(client) });
  }

  // Each round runs its cycles in blocks of BLOCK, the ways in turn (a, b…, c…, a, b…), so that
  // every way's time is summed over the same stretches of the machine's load: on a shared 2-core
  // VM, 1,000 cycles of one way then 1,000 of the next gave per-round ratios from 1.25 to 1.96
  // for one build. The figure is the median of the per-round ratios. The first round warms
  // everything up and is not counted.
  const BLOCK = 20;
  const ms = ways.map(() => [] as number[]);
  for (let r = 0; r <= ROUNDS; r++) {
    const sum = ways.map(() => 0);
    for (let done = 0; done < CYCLES; done += BLOCK) {
      const n = Math.min(BLOCK, CYCLES - done);
      for (const [i, w] of ways.entries()) sum[i]! += await cycles(`r${r}-${i}-${done}`, w.ops, n);
    }
    if (r > 0) for (const [i, t] of sum.entries()) ms[i]!.push(t);
  }
  process.stdout.write(`\n${CYCLES} × (create + snapshot + delete snapshot + delete) on the FlashArray mock; ${ROUNDS} interleaved rounds (after one to warm up): medians\n`);
  process.stdout.write(`${'through'.padEnd(40)} ${'ms'.padStart(8)} ${'ms/cycle'.padStart(9)} ${'ratio'.padStart(6)}\n`);
  for (const [i, w] of ways.entries()) {
    const t = median(ms[i]!);
    const ratio = median(ms[i]!.map((x, r) => x / ms[0]![r]!));
    process.stdout.write(`${w.what.padEnd(40)} ${t.toFixed(0).padStart(8)} ${(t / CYCLES).toFixed(2).padStart(9)} ${ratio.toFixed(2).padStart(6)}\n`);
  }
  // What the service adds over the hop alone, which runs none of our code (the machine's floor for (c)).
  const hop = ways.findIndex((w) => w.what.startsWith('(c0)'));
  for (const [i, w] of ways.entries()) {
    if (!w.what.startsWith('(c)')) continue;
    process.stdout.write(`${w.what} over (c0): ${median(ms[i]!.map((x, r) => x / ms[hop]![r]!)).toFixed(2)}\n`);
  }

  if (pg) process.stdout.write(`\njob takeover after a service's SIGKILL (lease 2 s): ${(await takeoverMs(await pg.createDatabase())).toFixed(0)} ms\n`);
} finally {
  for (const c of closers) await c();
  mock.kill('SIGTERM');
  await pg?.stop();
  rmSync(dir, { recursive: true, force: true });
}

/**
 * Two services on one database (two host identities: judged by lease); a copy started through
 * one, which is then killed; ms from the kill until the job's record names the other as its runner.
 */
async function takeoverMs(database: string): Promise<number> {
  const setup = await createBroker({ state: database, stateDir: join(dir, 'setup'), backends: [san] }, { plugins: builtinPlugins, logger: silentLogger, recoverJobs: false });
  await setup.volumes.create('san1/tk-src', { sizeBytes: 64 << 20 });
  await setup.volumes.create('san1/tk-dst', { sizeBytes: 64 << 20 });
  // Data to copy (a host copy skips what is not allocated): 16 MiB at 1 MiB/s outlasts the kill.
  const dev = await setup.volumes.open('san1/tk-src', 'rw');
  await dev.write(0, Buffer.alloc(16 << 20, 7));
  await dev.close();
  const service = async (name: string) => {
    const file = join(dir, `tk-${name}.json`);
    const socket = join(dir, `tk-${name}.sock`);
    writeFileSync(file, JSON.stringify({ state: database, stateDir: join(dir, `tk-${name}`), leaseSeconds: 2, backends: [san] }));
    const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'bin/main.ts'), '--config', file, 'serve', '--socket', socket],
      { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, OFFLOAD_RUNNER_HOST: `bench-${name}` } });
    await firstLine(child);
    return { child, api: await connectBroker(`unix:${socket}`) };
  };
  const a = await service('a');
  const b = await service('b');
  try {
    const job = await a.api.copy('san1/tk-src', 'san1/tk-dst', { speed: 1 << 20 });
    await new Promise((r) => setTimeout(r, 500));
    const killedAt = Date.now();
    a.child.kill('SIGKILL');
    for (;;) {
      const info = (await setup.jobs.get(job.id)).info();
      if (info.runner?.host === 'bench-b') return Date.now() - killedAt;
      await new Promise((r) => setTimeout(r, 20));
    }
  } finally {
    a.child.kill('SIGKILL');
    b.child.kill('SIGTERM');
    await Promise.allSettled([a.api.close(), b.api.close()]);
    await setup.close();
  }
}
