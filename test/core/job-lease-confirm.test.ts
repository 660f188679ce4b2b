/**
 * JobContext.confirmLease: a task checks, right before a side effect outside its own data (an
 * appliance's split, a chain switch), that its runner still holds the job. Once another runner has
 * taken the job over, the check throws, the side effect never happens, and the old runner writes
 * nothing more to the job's record.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { LockManager, silentLogger, type JobTask } from '../../core/index.js';
import { JobManager } from '../../core/jobs/job-manager.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';

const dir = mkdtempSync(join(tmpdir(), 'offload-lease-confirm-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A task that waits for `go`, confirms its lease, then makes its side effect. */
function sideEffectTask(): { task: JobTask; go(): void; effects: number } {
  let go!: () => void;
  const gate = new Promise<void>((r) => { go = r; });
  const out = {
    effects: 0,
    go: () => go(),
    task: {
      type: 'test', params: {},
      async run(ctx) {
        await ctx.checkpoint(1, { step: 1 });
        await gate;
        await ctx.confirmLease();
        out.effects++;
        await ctx.checkpoint(1, { step: 2 });
      },
    } satisfies JobTask,
  };
  return out;
}

describe('confirmLease', () => {
  it('passes while the runner holds the job, so the side effect happens once', async () => {
    const store = new SqliteStateStore(join(dir, 'a.sqlite'));
    const jobs = new JobManager(store, new LockManager(), async () => undefined, silentLogger, { leaseMs: 60_000 });
    try {
      const t = sideEffectTask();
      const job = await jobs.start({ task: t.task, ref: 'x/y', executor: 'host', principal: { id: 'admin', role: 'admin' }, locks: [] });
      t.go();
      const info = await job.wait();
      expect(info.error).toBeUndefined();
      expect(t.effects).toBe(1);
      expect(await store.getJob(job.id)).toMatchObject({ status: 'concluded', fence: 1 });
    } finally {
      await jobs.close();
      await store.close();
    }
  });

  it('throws once another runner took the job over: no side effect, and the record stays the new runner\'s', async () => {
    const file = join(dir, 'b.sqlite');
    const store = new SqliteStateStore(file);
    const other = new SqliteStateStore(file);
    const jobs = new JobManager(store, new LockManager(), async () => undefined, silentLogger, { leaseMs: 60_000 });
    try {
      const t = sideEffectTask();
      const job = await jobs.start({ task: t.task, ref: 'x/y', executor: 'host', principal: { id: 'admin', role: 'admin' }, locks: [] });
      for (let i = 0; i < 100 && (await store.getJob(job.id))?.checkpoint === undefined; i++) await new Promise((r) => setTimeout(r, 10));
      const rec = (await store.getJob(job.id))!;
      // Another runner takes it over (as after a partition: this one never noticed its lease end).
      expect(await other.claimJob(job.id, { token: rec.runnerToken, fence: rec.fence, leaseExpires: rec.leaseExpires }, { pid: 1, token: 'elsewhere', host: 'other-host' }, Date.now() + 60_000)).toBe(2);
      const taken = (await other.getJob(job.id))!;
      t.go();
      const e = (await job.wait().catch((x: unknown) => x)) as { code?: string; message?: string };
      expect(e.code).toBe('FailedPrecondition');
      expect(e.message).toMatch(/another runner took it over/);
      expect(t.effects).toBe(0);
      expect(await other.getJob(job.id)).toEqual(taken);
    } finally {
      await jobs.close();
      await store.close();
      await other.close();
    }
  });
});

describe('taking a job over in one process', () => {
  it('takeOver and the runner loop at once take the job over once: one claim, one run', async () => {
    const file = join(dir, 'c.sqlite');
    const store = new SqliteStateStore(file);
    let runs = 0;
    let finish!: () => void;
    const gate = new Promise<void>((r) => { finish = r; });
    const task: JobTask = { type: 'test', params: {}, async run(ctx) { runs++; await gate; await ctx.checkpoint(1); } };
    const now = new Date().toISOString();
    await store.insertJob({
      id: 'orphan', type: 'test', status: 'running', executor: 'host', ref: 'x/y', owner: 'admin', ownerRole: 'admin',
      progress: { current: 0, total: 1 }, speed: 0, cancelled: false, params: {}, createdAt: now, updatedAt: now,
      runnerPid: 0, runnerToken: 'released', runnerHost: '', leaseExpires: 0, seenAt: 0, fence: 3, locks: [],
    });
    const jobs = new JobManager(store, new LockManager(), async () => task, silentLogger, { leaseMs: 60_000 });
    try {
      jobs.adoptOrphans({ everyMs: 1 });
      const [a, b, r] = await Promise.all([jobs.takeOver('orphan'), jobs.takeOver('orphan'), jobs.recover()]);
      expect(a.id).toBe('orphan');
      expect(b.id).toBe('orphan');
      expect(r.failed).toEqual([]);
      await new Promise((res) => setTimeout(res, 50));
      expect(await store.getJob('orphan')).toMatchObject({ fence: 4, runnerPid: process.pid });
      finish();
      expect((await a.wait()).error).toBeUndefined();
      expect(runs).toBe(1);
      expect(await store.getJob('orphan')).toMatchObject({ status: 'concluded', fence: 4 });
    } finally {
      await jobs.close();
      await store.close();
    }
  });
});

describe('saveState', () => {
  /** A task that saves its state when told, and reports how that went. */
  function savingTask(): { task: JobTask; save(): Promise<unknown>; end(): void } {
    let ctxOf: Parameters<JobTask['run']>[0] | undefined;
    let started!: () => void;
    const running = new Promise<void>((r) => { started = r; });
    let end!: () => void;
    const ended = new Promise<void>((r) => { end = r; });
    return {
      end: () => end(),
      task: {
        type: 'test', params: {},
        async run(ctx) {
          ctxOf = ctx;
          started();
          await ended;
        },
      },
      save: async () => {
        await running;
        return Promise.resolve(ctxOf!.saveState({ step: 2 })).then(() => 'saved', (e: unknown) => e);
      },
    };
  }

  it('rejects when the state was not saved — the store failing, or another runner holding the job — where a checkpoint would go on', async () => {
    const file = join(dir, 'd.sqlite');
    const store = new SqliteStateStore(file);
    const other = new SqliteStateStore(file);
    const jobs = new JobManager(store, new LockManager(), async () => undefined, silentLogger, { leaseMs: 60_000 });
    try {
      const t = savingTask();
      const job = await jobs.start({ task: t.task, ref: 'x/y', executor: 'host', principal: { id: 'admin', role: 'admin' }, locks: [] });
      expect(await t.save()).toBe('saved');
      expect((await store.getJob(job.id))?.checkpoint).toEqual({ step: 2 });
      // The store fails this write.
      const update = store.updateJob.bind(store);
      store.updateJob = async () => { throw new Error('disk I/O error'); };
      expect(String(await t.save())).toMatch(/disk I\/O error/);
      store.updateJob = update;
      expect(await t.save()).toBe('saved');
      // Another runner takes it over: refused, and nothing written.
      const rec = (await store.getJob(job.id))!;
      expect(await other.claimJob(job.id, { token: rec.runnerToken, fence: rec.fence, leaseExpires: rec.leaseExpires }, { pid: 1, token: 'elsewhere', host: 'other-host' }, Date.now() + 60_000)).toBe(2);
      const taken = (await other.getJob(job.id))!;
      expect(String(await t.save())).toMatch(/taken over|lease/);
      expect(String(await t.save())).toMatch(/taken over|lease/);
      expect(await other.getJob(job.id)).toEqual(taken);
      t.end();
      await job.wait().catch(() => undefined);
      expect(await other.getJob(job.id)).toEqual(taken);
    } finally {
      await jobs.close();
      await store.close();
      await other.close();
    }
  });
});
