/**
 * A closing job manager keeps renewing the leases of its jobs until they have stopped and been
 * released: a job that takes longer than a lease to stop (a live copy suspending at a point, a last
 * flush) is never up for takeover while it still writes; once released, it is at once.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { LockManager, Shutdown, silentLogger, type JobTask } from '../../core/index.js';
import { JobManager } from '../../core/jobs/job-manager.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';

const dir = mkdtempSync(join(tmpdir(), 'offload-shutdown-lease-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('a closing job manager', () => {
  it('renews the lease of a job slow to stop until it is released; released, the job is free at once', async () => {
    const file = join(dir, 'jobs.sqlite');
    const store = new SqliteStateStore(file);
    const other = new SqliteStateStore(file);
    let stopping = false;
    let stopped!: () => void;
    const stoppedYet = new Promise<void>((r) => { stopped = r; });
    const task: JobTask = {
      type: 'test', params: {},
      async run(ctx) {
        try {
          for (;;) {
            await ctx.checkpoint(1, { at: 1 });
            await sleep(10);
          }
        } catch (e) {
          if (!(e instanceof Shutdown)) throw e;
          stopping = true;
          await sleep(1200); // four leases' worth of stopping
          stopped();
          throw e;
        }
      },
    };
    const jobs = new JobManager(store, new LockManager(), async () => task, silentLogger, { leaseMs: 300 });
    try {
      const job = await jobs.start({ task, ref: 'x/y', executor: 'host', principal: { id: 'admin', role: 'admin' }, locks: [] });
      await sleep(100);
      const closing = jobs.close();
      await sleep(800);
      expect(stopping).toBe(true);
      // Still stopping, well past the lease it had when the close began: renewed, and not released.
      const rec = (await other.getJob(job.id))!;
      expect(rec.runnerToken).not.toBe('released');
      expect(rec.leaseExpires).toBeGreaterThan(Date.now());
      await stoppedYet;
      await closing;
      expect(await other.getJob(job.id)).toMatchObject({ runnerToken: 'released', status: 'running' });
    } finally {
      await jobs.close();
      await store.close();
      await other.close();
    }
  });
});
