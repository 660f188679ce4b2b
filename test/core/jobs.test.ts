import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  ADMIN, JOB_TRANSITIONS, JOB_VERBS, LockManager, NotFound, RateLimiter, canTransition, createBroker,
  silentLogger, verbAllowed, type Broker, type JobContext, type JobEvent, type JobStatus, type JobTask,
} from '../../core/index.js';
import { JobManager } from '../../core/jobs/job-manager.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';
import { memoryModule } from '../support/memory-backend.js';
import { tickerModule } from '../support/ticker-backend.js';

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function manager(): JobManager {
  const store = new SqliteStateStore(':memory:');
  const m = new JobManager(store, new LockManager(), async () => undefined, silentLogger);
  cleanups.push(async () => {
    await m.close();
    await store.close();
  });
  return m;
}

/** A task driven by the test: each `step()` lets it move one chunk. */
function steppedTask(chunks: number, opts: { ready?: boolean } = {}) {
  let release: (() => void) | undefined;
  const gate = () => new Promise<void>((r) => (release = r));
  let ctxRef: JobContext | undefined;
  const task: JobTask = {
    type: 'test',
    params: { chunks },
    async run(ctx) {
      ctxRef = ctx;
      ctx.setTotal(chunks * 100);
      for (let i = 0; i < chunks; i++) {
        await gate();
        await ctx.checkpoint(100, { i });
      }
      if (opts.ready) {
        ctx.ready();
        await ctx.waitForComplete();
      }
    },
  };
  return {
    task,
    step: async () => {
      for (let i = 0; i < 50 && !release; i++) await new Promise((r) => setTimeout(r, 2));
      const r = release;
      release = undefined;
      r?.();
      await new Promise((r2) => setTimeout(r2, 5));
    },
    ctx: () => ctxRef,
  };
}

describe('job state machine (QEMU JobSTT and verb table)', () => {
  it('has QEMU\'s transitions', () => {
    expect(JOB_TRANSITIONS.running).toEqual(['paused', 'ready', 'waiting', 'aborting']);
    expect(canTransition('paused', 'running')).toBe(true);
    expect(canTransition('paused', 'concluded')).toBe(false);
    expect(canTransition('concluded', 'running')).toBe(false);
    expect(canTransition('ready', 'standby')).toBe(true);
  });
  it('allows verbs only where QEMU does', () => {
    expect(verbAllowed('complete', 'running')).toBe(false);
    expect(verbAllowed('complete', 'ready')).toBe(true);
    expect(verbAllowed('cancel', 'aborting')).toBe(false);
    expect(verbAllowed('dismiss', 'concluded')).toBe(true);
    expect(JOB_VERBS.pause).toContain('standby');
  });
});

describe('jobs', () => {
  it('a check that fails once the job\'s locks are held starts nothing: the error comes back, the locks are free, no job is recorded', async () => {
    const m = manager();
    const locks = [{ key: 'b/v', mode: 'exclusive' as const }];
    let checkedWhileHeld = false;
    await expect(m.start({
      task: steppedTask(1).task, ref: 'b/v', executor: 'host', principal: ADMIN, locks,
      check: async () => {
        // Run under the job's locks: another job on the same volume is refused meanwhile.
        checkedWhileHeld = await m.start({ task: steppedTask(1).task, ref: 'b/v', executor: 'host', principal: ADMIN, locks }).then(() => false, (e: { code?: string }) => e.code === 'Busy');
        throw new NotFound('volume b/v does not exist');
      },
    })).rejects.toMatchObject({ code: 'NotFound' });
    expect(checkedWhileHeld).toBe(true);
    expect(await m.list()).toEqual([]);
    const t = steppedTask(1);
    const job = await m.start({ task: t.task, ref: 'b/v', executor: 'host', principal: ADMIN, locks }); // the locks were released
    await t.step();
    await job.wait();
  });

  it('runs created → running → waiting → pending → concluded with progress in bytes and events', async () => {
    const m = manager();
    const t = steppedTask(3);
    const job = await m.start({ task: t.task, ref: 'b/v', executor: 'host', principal: ADMIN, locks: [{ key: 'b/v', mode: 'exclusive' }] });
    const statuses: JobStatus[] = [];
    const progress: number[] = [];
    job.on((e: JobEvent) => (e.type === 'status' ? statuses.push(e.job.status) : e.type === 'progress' && progress.push(e.job.progress.current)));
    // Steps further apart than progress events may come (100 ms): each is an event of its own.
    for (let i = 0; i < 3; i++) {
      await t.step();
      await new Promise((r) => setTimeout(r, 110));
    }
    const info = await job.wait();
    expect(info.error).toBeUndefined();
    expect(statuses).toEqual(['waiting', 'pending', 'concluded']);
    expect(progress).toEqual([100, 200, 300]);
    expect(info.progress).toEqual({ current: 300, total: 300 });
  });

  it('the bytes a job moves forward are reported as they go (the hook of the bytes counters), by executor; what a resumed job redid counts again, nothing counts twice here', async () => {
    const store = new SqliteStateStore(':memory:');
    const events: { job: string; executor: string; bytes: number }[] = [];
    const m = new JobManager(store, new LockManager(), async () => undefined, silentLogger, {
      onEvent: (e) => { if (e.type === 'processed') events.push({ job: e.job, executor: e.executor, bytes: e.bytes }); },
    });
    cleanups.push(async () => { await m.close(); await store.close(); });
    const t = steppedTask(3);
    const job = await m.start({ task: t.task, ref: 'b/v', executor: 'backend:san', principal: ADMIN, locks: [] });
    for (let i = 0; i < 3; i++) await t.step();
    await job.wait();
    expect(events).toEqual([100, 100, 100].map((bytes) => ({ job: job.id, executor: 'backend:san', bytes })));
    // A job that reports its progress as a whole (setProgress), stepping back and then past its total: only the steps forward.
    const jumpy: JobTask = { type: 'test', params: {}, async run(ctx) { ctx.setTotal(1000); ctx.setProgress(400); ctx.setProgress(300); ctx.setProgress(900); } };
    events.length = 0;
    await (await m.start({ task: jumpy, ref: 'b/w', executor: 'host', principal: ADMIN, locks: [] })).wait();
    expect(events.map((e) => e.bytes)).toEqual([400, 500, 100]); // the last: the conclusion makes it whole
  });

  it('progress events come at most every 100 ms, the latest delivered; none after the conclusion', async () => {
    const m = manager();
    let finish!: () => void;
    const finished = new Promise<void>((r) => (finish = r));
    const task: JobTask = {
      type: 'test',
      params: {},
      async run(ctx) {
        ctx.setTotal(1000);
        await new Promise((r) => setTimeout(r, 20)); // the listener is attached meanwhile
        for (let i = 0; i < 10; i++) await ctx.checkpoint(50); // a burst: 500 bytes
        await finished;
        for (let i = 0; i < 10; i++) await ctx.checkpoint(50); // and one that the conclusion follows at once
      },
    };
    const job = await m.start({ task, ref: 'b/v', executor: 'host', principal: ADMIN, locks: [] });
    const events: { type: string; current: number; at: number }[] = [];
    const t0 = Date.now();
    job.on((e: JobEvent) => events.push({ type: e.type, current: e.job.progress.current, at: Date.now() - t0 }));
    await new Promise((r) => setTimeout(r, 250));
    const progress = events.filter((e) => e.type === 'progress');
    // The first at once, the rest of the burst held back and sent once, as it was at the end.
    expect(progress.map((e) => e.current)).toEqual([50, 500]);
    expect(progress[1]!.at - progress[0]!.at).toBeGreaterThanOrEqual(90);
    finish();
    const info = await job.wait();
    await new Promise((r) => setTimeout(r, 150));
    expect(info.progress.current).toBe(1000);
    // The second burst: its first event at once, the rest held back — dropped at the conclusion,
    // which carries 1000 (or, on a machine slow enough that the conclusion came 100 ms later, sent before it).
    const later = events.filter((e) => e.type === 'progress').map((e) => e.current);
    expect(later.slice(0, 3)).toEqual([50, 500, 550]);
    expect(later.slice(3).every((c) => c === 1000)).toBe(true);
    expect(events.at(-1)).toMatchObject({ type: 'completed', current: 1000 }); // 150 ms after: nothing followed it
  });

  it('pauses and resumes; verbs in the wrong state are refused', async () => {
    const m = manager();
    const t = steppedTask(3);
    const job = await m.start({ task: t.task, ref: 'b/v', executor: 'host', principal: ADMIN, locks: [] });
    await t.step();
    await job.pause();
    expect(job.info().status).toBe('paused');
    await expect(job.pause()).rejects.toThrow(/already paused/);
    await expect(job.complete()).rejects.toThrow(expect.objectContaining({ code: 'FailedPrecondition' }));
    await expect(job.dismiss()).rejects.toThrow(expect.objectContaining({ code: 'FailedPrecondition' }));
    await t.step(); // the chunk finishes, then the task waits at its pause point
    const held = job.info().progress.current;
    await new Promise((r) => setTimeout(r, 30));
    expect(job.info().progress.current).toBe(held);
    await job.resume();
    expect(job.info().status).toBe('running');
    await t.step();
    const info = await job.wait();
    expect(info.error).toBeUndefined();
    await job.dismiss();
    await expect(m.get(job.id)).rejects.toThrow(expect.objectContaining({ code: 'NotFound' }));
  });

  it('cancel (also of a paused job) concludes with Cancelled and releases its locks', async () => {
    const locks = new LockManager();
    const store = new SqliteStateStore(':memory:');
    const m = new JobManager(store, locks, async () => undefined, silentLogger);
    cleanups.push(async () => { await m.close(); await store.close(); });
    const t = steppedTask(5);
    const job = await m.start({ task: t.task, ref: 'b/v', executor: 'host', principal: ADMIN, locks: [{ key: 'b/v', mode: 'exclusive' }] });
    await t.step();
    await job.pause();
    await job.cancel();
    await t.step();
    const info = await job.wait();
    expect(info.status).toBe('concluded');
    expect(info.error?.code).toBe('Cancelled');
    expect(info.cancelled).toBe(true);
    expect(await locks.list()).toHaveLength(0);
    await expect(job.result()).rejects.toMatchObject({ code: 'Cancelled' });
  });

  it('a mirror-like job reaches ready, pauses into standby, and completes on request', async () => {
    const m = manager();
    const t = steppedTask(1, { ready: true });
    const job = await m.start({ task: t.task, ref: 'b/v', executor: 'host', principal: ADMIN, locks: [] });
    await t.step();
    for (let i = 0; i < 100 && job.info().status !== 'ready'; i++) await new Promise((r) => setTimeout(r, 5));
    expect(job.info().status).toBe('ready');
    await job.pause();
    expect(job.info().status).toBe('standby');
    await job.resume();
    expect(job.info().status).toBe('ready');
    await job.complete();
    const info = await job.wait();
    expect(info.error).toBeUndefined();
  });

  it('a failing task concludes with its typed error', async () => {
    const m = manager();
    const job = await m.start({
      task: { type: 'boom', params: {}, run: async () => { throw new Error('disk on fire'); } },
      ref: 'b/v', executor: 'host', principal: ADMIN, locks: [],
    });
    const info = await job.wait();
    expect(info.error).toEqual({ code: 'Internal', message: expect.stringMatching(/disk on fire/) });
  });

  it('speed is validated and settable while running', async () => {
    const m = manager();
    const t = steppedTask(2);
    const job = await m.start({ task: t.task, ref: 'b/v', executor: 'host', principal: ADMIN, locks: [] });
    await expect(job.setSpeed(-1)).rejects.toThrow(expect.objectContaining({ code: 'InvalidArgument' }));
    await job.setSpeed(1_000_000);
    expect(job.info().speed).toBe(1_000_000);
    await t.step();
    await t.step();
    await job.wait();
    await expect(job.setSpeed(5)).rejects.toThrow(expect.objectContaining({ code: 'FailedPrecondition' }));
  });
  it('many copies waiting for the speed limit at once are all woken by a cancel, with no leak warning (one abort listener for them all)', async () => {
    const m = manager();
    const warnings: Error[] = [];
    const onWarning = (w: Error) => warnings.push(w);
    process.on('warning', onWarning);
    cleanups.push(() => { process.off('warning', onWarning); });
    let waiting = 0;
    const job = await m.start({
      task: {
        type: 'paced', params: {},
        run: async (ctx) => {
          // 32 workers, as a mirror's copy workers pace themselves, each far beyond the speed.
          await Promise.all(Array.from({ length: 32 }, async () => {
            for (;;) {
              waiting++;
              await ctx.pace!(1 << 20);
              waiting--;
            }
          }));
        },
      },
      ref: 'b/v', executor: 'host', principal: ADMIN, locks: [], speed: 1024,
    });
    for (let i = 0; i < 200 && waiting < 32; i++) await new Promise((r) => setTimeout(r, 5));
    expect(waiting).toBe(32);
    await job.cancel();
    expect(await job.wait()).toMatchObject({ status: 'concluded', cancelled: true });
    await new Promise((r) => setImmediate(r)); // warnings are emitted on the next tick
    expect(warnings.filter((w) => w.name === 'MaxListenersExceededWarning')).toEqual([]);
  });
});

describe('rate limiter', () => {
  it('delays so that the average rate is the speed (100 ms burst allowed)', () => {
    let now = 0;
    const r = new RateLimiter(() => now);
    expect(r.delayFor(1000)).toBe(0);
    r.setSpeed(1000); // 1000 B/s
    let waited = 0;
    for (let i = 0; i < 10; i++) {
      const d = r.delayFor(500);
      waited += d;
      now += d;
    }
    // 5000 bytes at 1000 B/s take 5 s, less the 100 ms burst.
    expect(waited).toBeCloseTo(4900, -1);
    r.setSpeed(0);
    expect(r.delayFor(1e9)).toBe(0);
  });
});

describe('jobs through the broker', () => {
  async function broker(state: string, extra: Record<string, unknown> = {}): Promise<Broker> {
    const b = await createBroker({ state, backends: [{ name: 'tick', kind: 'ticker', steps: 40, stepMs: 10, ...extra }] }, { plugins: [tickerModule], logger: silentLogger });
    cleanups.push(() => b.close());
    return b;
  }

  it('persists jobs: a new broker on the same state sees the concluded job', async () => {
    const state = mkdtempSync(join(tmpdir(), 'offload-jobs-'));
    cleanups.push(() => rmSync(state, { recursive: true, force: true }));
    const b1 = await broker(state, { stepMs: 0 });
    const job = await b1.stream('tick/v');
    await job.wait();
    await b1.close();
    const b2 = await broker(state);
    const info = (await b2.jobs.get(job.id)).info();
    expect(info).toMatchObject({ status: 'concluded', type: 'stream', executor: 'backend:tick', ref: 'tick/v', owner: 'admin' });
    expect(info.plan).toMatchObject({ supported: true });
  });

  it('a verb from another broker (another process) reaches the running job', async () => {
    const state = mkdtempSync(join(tmpdir(), 'offload-jobs-'));
    cleanups.push(() => rmSync(state, { recursive: true, force: true }));
    const b1 = await broker(state);
    const b2 = await broker(state);
    const job = await b1.stream('tick/v');
    // the other broker refuses a conflicting job on the same volume, naming the job
    await expect(b2.stream('tick/v')).rejects.toMatchObject({ code: 'Busy', message: expect.stringContaining(job.id) });
    await b2.jobs.cancel(job.id);
    const info = await job.wait();
    expect(info.error?.code).toBe('Cancelled');
  });

  it('a stream holds an exclusive lock: a second stream of the volume is Busy', async () => {
    const state = mkdtempSync(join(tmpdir(), 'offload-jobs-'));
    cleanups.push(() => rmSync(state, { recursive: true, force: true }));
    const b = await broker(state);
    const job = await b.stream('tick/v');
    await expect(b.stream('tick/v')).rejects.toMatchObject({ code: 'Busy' });
    await job.cancel();
    await job.wait();
    const again = await b.stream('tick/v', { speed: 0 });
    await again.cancel();
    await again.wait();
  });
});

describe('memory stream through the broker', () => {
  it('tenants see and control only their own jobs; an admin can cancel any', async () => {
    const state = mkdtempSync(join(tmpdir(), 'offload-jobs-'));
    cleanups.push(() => rmSync(state, { recursive: true, force: true }));
    const admin = await createBroker({ state, backends: [{ name: 'm', kind: 'memory', streamDelayMs: 5 }] }, { plugins: [memoryModule], logger: silentLogger });
    cleanups.push(() => admin.close());
    const alice = admin.as({ id: 'alice', role: 'tenant' });
    const bob = admin.as({ id: 'bob', role: 'tenant' });
    await alice.volumes.create('m/base', { sizeBytes: 1 << 20 });
    const dev = await alice.volumes.open('m/base', 'rw');
    await dev.write(0, new Uint8Array(256 * 1024).fill(7));
    await dev.close();
    await alice.snapshots.create('m/base@s');
    await alice.clone('m/base@s', 'm/child', { mode: 'linked' });
    const job = await alice.stream('m/child');
    expect((await bob.jobs.list())).toHaveLength(0);
    await expect(bob.jobs.cancel(job.id)).rejects.toThrow(expect.objectContaining({ code: 'NotFound' }));
    await expect(bob.volumes.get('m/child')).rejects.toMatchObject({ code: 'NotFound' });
    expect((await alice.jobs.list()).map((j) => j.id)).toEqual([job.id]);
    await admin.jobs.cancel(job.id);
    expect((await job.wait()).error?.code).toBe('Cancelled');
  });
});

describe('jobs: hard cases', () => {
  it('a job whose chunk fails while it is paused concludes with the error and frees its locks', async () => {
    const locks = new LockManager();
    const store = new SqliteStateStore(':memory:');
    const m = new JobManager(store, locks, async () => undefined, silentLogger);
    cleanups.push(async () => { await m.close(); await store.close(); });
    let fail!: (e: Error) => void;
    const job = await m.start({
      task: { type: 't', params: {}, run: () => new Promise<void>((_, reject) => (fail = reject)) },
      ref: 'b/v', executor: 'host', principal: ADMIN, locks: [{ key: 'b/v', mode: 'exclusive' }],
    });
    await job.pause();
    fail(new Error('read error on chunk 3'));
    const info = await job.wait();
    expect(info.status).toBe('concluded');
    expect(info.error?.message).toMatch(/read error on chunk 3/);
    expect(await locks.list()).toHaveLength(0);
  });

  it('two brokers starting a conflicting job at the same moment: exactly one runs', async () => {
    const state = mkdtempSync(join(tmpdir(), 'offload-jobs-'));
    cleanups.push(() => rmSync(state, { recursive: true, force: true }));
    const open = async () => {
      const b = await createBroker({ state, backends: [{ name: 'tick', kind: 'ticker', steps: 40, stepMs: 10 }] }, { plugins: [tickerModule], logger: silentLogger });
      cleanups.push(() => b.close());
      return b;
    };
    const [a, b] = [await open(), await open()];
    const results = await Promise.allSettled([a.stream('tick/v'), b.stream('tick/v')]);
    expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
    expect(results.find((r) => r.status === 'rejected')).toMatchObject({ reason: { code: 'Busy' } });
    for (const r of results) if (r.status === 'fulfilled') r.value.cancel();
  });

  it('closing a broker stops its jobs without concluding them: wait() rejects, the next broker resumes', async () => {
    const state = mkdtempSync(join(tmpdir(), 'offload-jobs-'));
    cleanups.push(() => rmSync(state, { recursive: true, force: true }));
    const cfg = { state, backends: [{ name: 'tick', kind: 'ticker', steps: 30, stepMs: 10 }] };
    const b1 = await createBroker(cfg, { plugins: [tickerModule], logger: silentLogger });
    const job = await b1.stream('tick/v');
    await new Promise((r) => setTimeout(r, 60));
    await b1.close();
    await expect(job.wait()).rejects.toMatchObject({ code: 'FailedPrecondition' });
    const [b2, b3] = await Promise.all([
      createBroker(cfg, { plugins: [tickerModule], logger: silentLogger }),
      createBroker(cfg, { plugins: [tickerModule], logger: silentLogger }),
    ]);
    cleanups.push(() => b2.close(), () => b3.close());
    const info = await b2.jobs.wait(job.id).catch(() => b3.jobs.wait(job.id));
    expect(info.error).toBeUndefined();
    expect(info.progress.current).toBe(info.progress.total);
  });
});

describe('locks across processes', () => {
  it('a short operation in one broker holds off a job in another, and the reverse', async () => {
    const state = mkdtempSync(join(tmpdir(), 'offload-ops-'));
    const file = join(state, 'jobs.sqlite');
    const s1 = new SqliteStateStore(file);
    const s2 = new SqliteStateStore(file);
    const l1 = new LockManager();
    const m1 = new JobManager(s1, l1, async () => undefined, silentLogger);
    // Its jobs wait in line 1 s (not 30) before Busy.
    const m2 = new JobManager(s2, new LockManager(), async () => undefined, silentLogger, { lineWaitMs: 1000 });
    // A short operation as runShort takes it: granted here, published and checked against the others in one step.
    const operation = (id: string, description: string) => {
      const locks = [{ key: 'b/v', mode: 'exclusive' as const }];
      return l1.acquirePublished(locks, { id, principal: ADMIN, description }, () => m1.publishOperation(id, locks, ADMIN, description));
    };
    cleanups.push(async () => {
      await m1.close();
      await m2.close();
      await s1.close();
      await s2.close();
      rmSync(state, { recursive: true, force: true });
    });
    const revert = await operation('op-revert', 'revert b/v@s');
    const t = steppedTask(1);
    await expect(m2.start({ task: t.task, ref: 'b/v', executor: 'host', principal: ADMIN, locks: [{ key: 'b/v', mode: 'exclusive' }] }))
      .rejects.toMatchObject({ code: 'Busy', message: expect.stringMatching(/operation op-revert \(revert b\/v@s/) });
    await revert.release();
    const job = await m2.start({ task: t.task, ref: 'b/v', executor: 'host', principal: ADMIN, locks: [{ key: 'b/v', mode: 'exclusive' }] });
    await expect(operation('op-resize', 'resize b/v')).rejects.toThrow(expect.objectContaining({ code: 'Busy' }));
    // The refused claim was withdrawn: only the job holds b/v.
    expect((await s1.listOpLocks()).map((o) => o.id)).toEqual([]);
    await t.step();
    await job.wait();
    await (await operation('op-resize', 'resize b/v')).release();
    expect(await s1.listOpLocks()).toEqual([]);
  });

  it("another broker's short operation is waited for, not refused, and its locks leave the store once it ends", async () => {
    const state = mkdtempSync(join(tmpdir(), 'offload-ops-'));
    const file = join(state, 'jobs.sqlite');
    const stores = [new SqliteStateStore(file), new SqliteStateStore(file)];
    const lockManagers = [new LockManager(), new LockManager()];
    const managers = stores.map((st, i) => new JobManager(st, lockManagers[i]!, async () => undefined, silentLogger));
    cleanups.push(async () => {
      for (const m of managers) await m.close();
      for (const st of stores) await st.close();
      rmSync(state, { recursive: true, force: true });
    });
    const locks = [{ key: 'b/v', mode: 'exclusive' as const }];
    const operation = (i: number, id: string) =>
      lockManagers[i]!.acquirePublished(locks, { id, principal: ADMIN, description: id }, () => managers[i]!.publishOperation(id, locks, ADMIN, id));
    const first = await operation(0, 'op-first');
    let secondHeld = false;
    const second = operation(1, 'op-second').then((l) => { secondHeld = true; return l; });
    await new Promise((r) => setTimeout(r, 300));
    expect(secondHeld).toBe(false); // still waiting, not refused
    // Waiting in line: its claim stays in the store, after the first's (a later claim waits for it).
    expect((await stores[0]!.listOpLocks()).map((o) => o.id)).toEqual(['op-first', 'op-second']);
    await first.release();
    const lease = await second;
    expect((await stores[0]!.listOpLocks()).map((o) => o.id)).toEqual(['op-second']);
    // Operations of both brokers at once on one key: each waits its turn, none is refused, never two at once.
    await lease.release();
    let inside = 0;
    let most = 0;
    await Promise.all(Array.from({ length: 12 }, async (_, i) => {
      const l = await operation(i % 2, `op-many-${i}`);
      most = Math.max(most, ++inside);
      await new Promise((r) => setTimeout(r, 3));
      inside--;
      await l.release();
    }));
    expect(most).toBe(1);
    expect(await stores[0]!.listOpLocks()).toEqual([]);
    // A job is not waited for: an operation meeting one is Busy at once.
    await lease.release();
    const t = steppedTask(1);
    const job = await managers[0]!.start({ task: t.task, ref: 'b/v', executor: 'host', principal: ADMIN, locks });
    await expect(operation(1, 'op-third')).rejects.toMatchObject({ code: 'Busy', message: expect.stringContaining(job.id) });
    expect((await stores[0]!.listOpLocks()).map((o) => o.id)).toEqual([]);
    await t.step();
    await job.wait();
  });
});
