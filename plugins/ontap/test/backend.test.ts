/**
 * The ontap backend end to end against the mock appliance on a loopback port: the clone split
 * as an offloaded broker job (progress from the appliance, cancel, resume after a restart), and
 * the appliance's own faults seen through the plugin.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createBroker, LeaseLost, Shutdown, silentLogger, type Broker, type JobContext, type JobInfo } from '../../../core/index.js';
import { startOntapMock, type OntapMock, type OntapMockOptions } from '../appliance/server.js';
import { ontapModule } from '../module.js';
import { failure, makeBackend } from './helpers.js';

const MiB = 1024 * 1024;
const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function mock(opts: OntapMockOptions = {}): Promise<OntapMock> {
  const m = await startOntapMock({ port: 0, jobDurationMs: 10, ...opts });
  cleanups.push(() => m.close());
  return m;
}

const backendOf = (m: OntapMock, extra: Record<string, unknown> = {}) => makeBackend(m.url, extra, { username: m.username, password: m.password });

async function broker(m: OntapMock): Promise<Broker> {
  const state = mkdtempSync(join(tmpdir(), 'ontap-broker-'));
  const b = await createBroker(
    {
      state,
      backends: [{ name: 'nas1', kind: 'ontap', endpoint: m.url, username: m.username, password: m.password, svm: 'svm0', pollIntervalMs: 5, pollMaxIntervalMs: 20 }],
    },
    { plugins: [ontapModule], logger: silentLogger },
  );
  cleanups.push(async () => {
    await b.close();
    rmSync(state, { recursive: true, force: true });
  });
  return b;
}

/** A parent with `dataBytes` written, a snapshot, and a linked clone of it. */
async function cloneWithData(b: Broker, dataBytes: number): Promise<Buffer> {
  await b.volumes.create('nas1/gold', { sizeBytes: 16 * MiB });
  const data = Buffer.alloc(dataBytes);
  for (let i = 0; i < data.length; i++) data[i] = (i * 13) & 0xff;
  const dev = await b.volumes.open('nas1/gold', 'rw');
  await dev.write(0, data);
  await dev.close();
  await b.snapshots.create('nas1/gold@base');
  await b.clone('nas1/gold@base', 'nas1/vm1', { mode: 'linked' });
  return data;
}

/** A JobContext for driving a task directly (what the broker's job manager provides). */
function context(resumeFrom?: unknown) {
  const abort = new AbortController();
  const progress: [number, number][] = [];
  const saved: unknown[] = [];
  const ctx: JobContext = {
    jobId: 'test-job', signal: abort.signal, resumeFrom, speed: 0, confirmLease: async () => undefined, checkLease: () => undefined, leaseUntil: undefined,
    setTotal() {}, advance() {},
    setProgress(current, total) {
      progress.push([current, total ?? 0]);
    },
    async checkpoint(_b, state) {
      if (state !== undefined) saved.push(state);
      if (abort.signal.aborted) throw abort.signal.reason;
    },
    saveState(s) {
      saved.push(s);
    },
    beforeSave: () => () => {},
    ready() {}, waitForComplete: async () => {}, completeRequested: false,
  };
  return { ctx, abort, progress, saved };
}

describe('clone split as an offloaded broker job', () => {
  it('runs on the appliance (executor backend:nas1), reports the appliance progress, and frees the parent', async () => {
    const m = await mock({ splitBytesPerSecond: 16 * MiB });
    const b = await broker(m);
    const data = await cloneWithData(b, 4 * MiB);
    expect((await b.volumes.get('nas1/vm1')).parent).toBe('nas1/gold@base');
    const job = await b.stream('nas1/vm1');
    const seen: JobInfo[] = [];
    job.on((e) => {
      if (e.type === 'progress') seen.push(e.job);
    });
    const info = await job.wait();
    expect(info.error).toBeUndefined();
    expect(info.executor).toBe('backend:nas1');
    expect(info.progress.total).toBe(4 * MiB); // the shared data the split had to copy
    expect(info.progress.current).toBe(4 * MiB);
    const partial = seen.filter((s) => s.progress.current > 0 && s.progress.current < s.progress.total);
    expect(partial.length).toBeGreaterThan(0); // 4 MiB at 16 MiB/s: progress seen mid-way
    const currents = seen.map((s) => s.progress.current);
    expect([...currents].sort((a, c) => a - c)).toEqual(currents);
    expect((await b.volumes.get('nas1/vm1')).parent).toBeUndefined();
    await b.snapshots.delete('nas1/gold@base');
    await b.volumes.delete('nas1/gold');
    const dev = await b.volumes.open('nas1/vm1', 'r');
    expect(Buffer.from(await dev.read(0, data.length)).equals(data)).toBe(true);
    await dev.close();
  });

  it('cancelling the broker job cancels the appliance job; the clone stays a clone', async () => {
    const m = await mock({ splitBytesPerSecond: 1 * MiB });
    const b = await broker(m);
    await cloneWithData(b, 8 * MiB);
    const job = await b.stream('nas1/vm1');
    for (let i = 0; i < 1000 && job.info().progress.current === 0; i++) await new Promise((r) => setTimeout(r, 10));
    expect(job.info().progress.current).toBeGreaterThan(0);
    await job.cancel();
    const info = await job.wait();
    expect(info.error?.code).toBe('Cancelled');
    const splitJobs = m.appliance.allJobs().filter((j) => j.kind === 'split');
    expect(splitJobs).toHaveLength(1);
    expect(splitJobs[0]).toMatchObject({ state: 'failure', error: { code: '262290' } });
    expect((await b.volumes.get('nas1/vm1')).parent).toBe('nas1/gold@base');
    await expect(b.volumes.delete('nas1/gold')).rejects.toMatchObject({ code: 'FailedPrecondition' });
  });

  it('stream with a base is Unsupported; streaming a volume that is not a clone is a no-op job', async () => {
    const m = await mock();
    const be = backendOf(m);
    await be.createVolume({ name: 'plain', sizeBytes: MiB });
    await expect(be.streamVolume('plain', { base: 'x' })).rejects.toMatchObject({ code: 'Unsupported' });
    await expect(be.streamVolume('ghost', {})).rejects.toMatchObject({ code: 'NotFound' });
    const task = await be.streamVolume('plain', {});
    const { ctx, progress } = context();
    await task.run(ctx);
    expect(progress).toEqual([[0, 0]]);
    expect(m.appliance.allJobs().filter((j) => j.kind === 'split')).toHaveLength(0);
  });
});

describe('resuming a split after a broker restart (resumeTask)', () => {
  async function startedSplit(rate: number) {
    const m = await mock({ splitBytesPerSecond: rate });
    const be = backendOf(m);
    await be.createVolume({ name: 'gold', sizeBytes: 8 * MiB });
    const dev = await be.openVolume('gold', 'rw');
    await dev.write(0, Buffer.alloc(2 * MiB, 7));
    await be.createSnapshot('gold', 'base');
    await be.createVolume({ name: 'vm1', source: { volume: 'gold', snapshot: 'base' }, mode: 'linked' });
    // The split a previous broker started before it died.
    const first = await be.streamVolume('vm1', {});
    const { ctx, abort, saved } = context();
    const running = first.run(ctx);
    for (let i = 0; i < 500 && saved.length === 0; i++) await new Promise((r) => setTimeout(r, 5));
    // The first runner is abandoned (as by a crash) before the mock goes away.
    const abandon = () => {
      abort.abort();
      return running.catch(() => undefined);
    };
    cleanups.push(abandon);
    /** Stop the first run as its owner would (a reason); resolves to how the run ended. */
    const stop = (reason: Error) => {
      abort.abort(reason);
      return running.then(() => undefined, (e: unknown) => e);
    };
    return { m, be, params: first.params, checkpoint: saved[0], abandon, stop };
  }

  it('from its checkpoint: follows the same appliance job to the end', async () => {
    const { m, be, params, checkpoint } = await startedSplit(4 * MiB);
    expect(checkpoint).toMatchObject({ jobUuid: expect.any(String) });
    const task = await be.resumeTask('stream', params);
    expect(task).toBeDefined();
    const { ctx, progress } = context(checkpoint);
    await task!.run(ctx);
    // Resumed mid-way, the total is inferred from the appliance's percentage: near 2 MiB, and reached.
    const [current, total] = progress[progress.length - 1]!;
    expect(current).toBe(total);
    expect(Math.abs(total - 2 * MiB)).toBeLessThanOrEqual(2 * MiB * 0.05);
    expect(m.appliance.allJobs().filter((j) => j.kind === 'split')).toHaveLength(1); // no second split
    expect((await be.getVolume('vm1'))?.parent).toBeUndefined();
  });

  for (const [why, reason] of [['lost to another runner (LeaseLost)', () => new LeaseLost('taken over')], ['stopped for a later run (Shutdown)', () => new Shutdown('closing')]] as const) {
    it(`a runner ${why} leaves the appliance's split running; the next run follows it to the end`, async () => {
      const { m, be, params, checkpoint, stop } = await startedSplit(1 * MiB);
      const why = reason();
      expect(await stop(why)).toBe(why);
      const splits = m.appliance.allJobs().filter((j) => j.kind === 'split');
      expect(splits).toHaveLength(1);
      expect(splits[0]!.state).not.toBe('failure'); // not cancelled on the appliance
      const task = await be.resumeTask('stream', params);
      await task!.run(context(checkpoint).ctx);
      expect(m.appliance.allJobs().filter((j) => j.kind === 'split')).toMatchObject([{ state: 'success' }]);
      expect((await be.getVolume('vm1'))?.parent).toBeUndefined();
    });
  }

  it('without a checkpoint: finds the running appliance job by its description', async () => {
    const { m, be, params } = await startedSplit(2 * MiB);
    const task = await be.resumeTask('stream', params);
    const { ctx, saved } = context(undefined);
    await task!.run(ctx);
    const splits = m.appliance.allJobs().filter((j) => j.kind === 'split');
    expect(splits).toHaveLength(1);
    expect(saved).toContainEqual({ jobUuid: splits[0]!.uuid });
  });

  it('a split that ended while the broker was down: done at once; unknown task types are not resumable', async () => {
    const { be, params, abandon } = await startedSplit(64 * MiB);
    for (let i = 0; i < 500 && (await be.getVolume('vm1'))?.parent !== undefined; i++) await new Promise((r) => setTimeout(r, 10));
    const task = await be.resumeTask('stream', params);
    await task!.run(context(undefined).ctx);
    await abandon();
    expect(await be.resumeTask('commit', params)).toBeUndefined();
    expect(await be.resumeTask('stream', {})).toBeUndefined();
  });
});

describe('appliance faults through the plugin', () => {
  it('a create answered after the client gave up (but done) is retried into "duplicate" and returns the volume', async () => {
    const m = await mock({ faults: { rules: [{ method: 'POST', path: '/api/storage/volumes', nth: [1], action: { type: 'late', ms: 400 } }] } });
    const be = backendOf(m, { retry: { maxAttempts: 3, baseDelayMs: 1, maxDelayMs: 10, requestTimeoutMs: 100 } });
    const v = await be.createVolume({ name: 'late', sizeBytes: 2 * MiB });
    expect(v).toMatchObject({ name: 'late', sizeBytes: 2 * MiB });
    expect(m.faults.list()[0]).toMatchObject({ calls: 2, fired: 1 }); // two POSTs, one volume
    expect(m.appliance.allVolumes().filter((x) => x.name === 'late')).toHaveLength(1);
  });

  it('a job stuck in running past the budget is Timeout; nothing was created', async () => {
    const m = await mock({ faults: { rules: [{ method: 'POST', path: '/api/storage/volumes', action: { type: 'job-stuck' } }] } });
    const e = await failure(backendOf(m, { pollBudgetMs: 80 }).createVolume({ name: 'stuck', sizeBytes: MiB }));
    expect(e.code).toBe('Timeout');
    expect(e.hint).toMatch(/api\/cluster\/jobs/);
    expect(m.appliance.allVolumes()).toHaveLength(0);
  });

  it('a failed job is its typed error; an expired job is resolved by looking the volume up', async () => {
    const m = await mock({
      faults: {
        rules: [
          { method: 'POST', path: '/api/storage/volumes/*/snapshots', nth: [1], action: { type: 'job-failure', afterPolls: 2, code: '1638555', message: 'Snapshot copy is busy' } },
          { method: 'POST', path: '/api/storage/volumes', nth: [1], action: { type: 'job-expired' } },
        ],
      },
    });
    const be = backendOf(m);
    expect(await be.createVolume({ name: 'v', sizeBytes: MiB })).toMatchObject({ name: 'v' });
    const e = await failure(be.createSnapshot('v', 's'));
    expect(e.code).toBe('FailedPrecondition');
    expect(e.data).toMatchObject({ ontapCode: '1638555' });
    expect(await be.listSnapshots('v')).toEqual([]);
  });

  it('429 with Retry-After and 503 from the appliance are ridden out', async () => {
    const m = await mock({
      faults: {
        rules: [
          { method: 'GET', path: '/api/storage/volumes', nth: [1], action: { type: 'status', status: 429, retryAfter: 0 } },
          { method: 'GET', path: '/api/storage/volumes', nth: [2], action: { type: 'status', status: 503 } },
        ],
      },
    });
    const be = backendOf(m);
    expect(await be.getVolume('nothing')).toBeUndefined();
    expect(m.faults.list().map((f) => f.fired)).toEqual([1, 1]);
  });

  it('wrong credentials are PermissionDenied', async () => {
    const m = await mock();
    const e = await failure(makeBackend(m.url, {}, { username: 'admin', password: 'wrong' }).getVolume('x'));
    expect(e.code).toBe('PermissionDenied');
  });

  it('deleting a snapshot that backs a clone is FailedPrecondition; the data path refuses out-of-range and read-only writes', async () => {
    const m = await mock();
    const be = backendOf(m);
    await be.createVolume({ name: 'p', sizeBytes: MiB });
    await be.createSnapshot('p', 's');
    await be.createVolume({ name: 'c', source: { volume: 'p', snapshot: 's' }, mode: 'linked', sizeBytes: 2 * MiB });
    expect(await be.getVolume('c')).toMatchObject({ sizeBytes: 2 * MiB, parent: 'nas1/p@s' });
    await expect(be.deleteSnapshot('p', 's')).rejects.toMatchObject({ code: 'FailedPrecondition' });
    await expect(be.createVolume({ name: 'c2', source: { volume: 'p' }, sizeBytes: 1024 })).rejects.toMatchObject({ code: 'OutOfRange' });
    const ro = await be.openVolume('c', 'r');
    await expect(ro.write(0, new Uint8Array(1))).rejects.toMatchObject({ code: 'FailedPrecondition' });
    await expect(ro.read(2 * MiB - 1, 2)).rejects.toMatchObject({ code: 'OutOfRange' });
    await ro.close();
    await expect(ro.read(0, 1)).rejects.toMatchObject({ code: 'FailedPrecondition' });
  });
});
