/**
 * The live copy as a job (core/live/mirror-task.ts) under the real job manager: its states
 * (running → ready → concluded on complete), the authoritative side it saves before the switch,
 * and what cancel leaves, with a writer and a model of its acknowledged writes.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ADMIN, type BlockDevice, type JobStatus } from '../../core/index.js';
import type { JobManager } from '../../core/jobs/job-manager.js';
import { LiveDevice } from '../../core/live/live-device.js';
import { mirrorTask, type MirrorState } from '../../core/live/mirror-task.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';
import { memoryDevice } from '../support/memory-device.js';
import { jobManager, plainPair } from '../support/mirror-jobs.js';

const KiB = 1024;
const MiB = 1024 * KiB;

function setup(mode: 'background' | 'write-blocking' = 'background', create = false, storeFile?: string) {
  const { store, m } = jobManager(storeFile);
  const size = 4 * MiB;
  const src = memoryDevice(size);
  const dst = memoryDevice(size);
  const live = new LiveDevice(src);
  const model = new Uint8Array(size);
  let closedOld: BlockDevice | undefined;
  let targetClosed = 0;
  const closedWith: unknown[] = [];
  let points = 0;
  let removed = 0;
  let undone = 0;
  const attached: (string | undefined)[] = [];
  const task = mirrorTask({ mode, pairs: [{ source: 'pool/src', target: 'pool/dst', ...(create ? { create: { sizeBytes: size, owner: 'admin' } } : {}) }] }, {
    pairs: [{
      source: live,
      attach: (id) => attached.push(id),
      detach: () => attached.push(undefined),
      openTarget: async () => ({ ...dst, close: async (o) => { targetClosed++; closedWith.push(o); } }),
      identify: async () => ({}),
      prepareSwitch: async () => ({ done: async (old) => { closedOld = old; }, undo: async () => { undone++; } }),
      removeTarget: async () => { removed++; },
      changesSince: async () => [],
      markPoint: async () => { points++; return 'point'; },
      dropSnapshot: async () => undefined,
    }],
    failClosed: () => undefined,
    dropIntent: async () => undefined,
  });
  const start = (speed?: number) => m.start({ task, ref: 'pool/src', executor: 'host', principal: ADMIN, locks: [{ key: 'pool/dst', mode: 'exclusive' }], ...(speed ? { speed } : {}) });
  let stop = false;
  let writes = 0;
  const writer = (async () => {
    let i = 0;
    while (!stop) {
      const offset = ((i * 7919) % 60) * 64 * KiB + (i % 13) * 512;
      const data = new Uint8Array(4 * KiB).fill(1 + (i % 250));
      await live.write(offset, data);
      model.set(data, offset);
      writes++;
      i++;
      await new Promise((r) => setTimeout(r, 1));
    }
  })();
  return {
    m, store, src, dst, live, model, start,
    get writes() { return writes; },
    get closedOld() { return closedOld; },
    get targetClosed() { return targetClosed; },
    closedWith,
    get points() { return points; },
    get removed() { return removed; },
    get undone() { return undone; },
    attached,
    stopWriter: async () => { stop = true; await writer; },
  };
}

const untilStatus = async (m: JobManager, id: string, status: JobStatus) => {
  for (let i = 0; i < 500; i++) {
    if ((await m.get(id)).info().status === status) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`job ${id} never reached ${status}: ${(await m.get(id)).info().status}`);
};

const same = (a: Uint8Array, b: Uint8Array) => Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0;

describe('the mirror job', () => {
  for (const mode of ['background', 'write-blocking'] as const) {
    it(`${mode}: running → ready while written, complete pivots; "target" is saved before the switch; every acknowledged write is on the target`, async () => {
      const t = setup(mode);
      await new Promise((r) => setTimeout(r, 20));
      const job = await t.start();
      await untilStatus(t.m, job.id, 'ready');
      expect(((await t.store.getJob(job.id))!.checkpoint as MirrorState).authoritative).toBe('source');
      const atReady = t.writes;
      await new Promise((r) => setTimeout(r, 50));
      expect(t.writes).toBeGreaterThan(atReady);
      await job.complete();
      const info = await job.wait();
      expect(info.error).toBeUndefined();
      expect(((await t.store.getJob(job.id))!.checkpoint as MirrorState).authoritative).toBe('target');
      expect(t.closedOld).toBeDefined();
      expect(t.live.current).not.toBe(t.closedOld);
      await t.stopWriter(); // writes after the pivot went to the target
      expect(same(await t.dst.read(0, t.dst.sizeBytes), t.model)).toBe(true);
      expect(t.targetClosed).toBe(0); // the export serves it now
      expect(t.attached).toEqual([job.id, undefined]);
      expect(t.undone).toBe(0);
    });
  }

  it('cancel after ready: concluded Cancelled, the source still serves, and the target is the source as it was (a consistent copy)', async () => {
    const t = setup();
    const job = await t.start();
    await untilStatus(t.m, job.id, 'ready');
    await t.stopWriter();
    await job.cancel();
    const info = await job.wait();
    expect(info.error?.code).toBe('Cancelled');
    expect(t.closedOld).toBeUndefined();
    expect(t.live.current).toBe(t.src);
    expect(same(await t.dst.read(0, t.dst.sizeBytes), t.model)).toBe(true);
    expect(((await t.store.getJob(job.id))!.checkpoint as MirrorState).authoritative).toBe('source');
    expect(t.targetClosed).toBe(1);
    expect(t.removed).toBe(0); // it did not create the target
    await t.live.write(0, new Uint8Array(4).fill(99)); // the source is no longer watched or mirrored
    expect([...(await t.dst.read(0, 4))]).not.toEqual([99, 99, 99, 99]);
  });

  it('cancel after ready of a target the job created: the consistent copy is kept', async () => {
    const t = setup('background', true);
    const job = await t.start();
    await untilStatus(t.m, job.id, 'ready');
    await t.stopWriter();
    await job.cancel();
    expect((await job.wait()).error?.code).toBe('Cancelled');
    expect(t.removed).toBe(0);
  });

  for (const create of [false, true]) it(`cancel before ready (a speed limit keeps it in the bulk pass): concluded Cancelled, nothing switched; a target it ${create ? 'created is deleted' : 'did not create is kept'}`, async () => {
    const t = setup('background', create);
    await new Promise((r) => setTimeout(r, 20));
    const job = await t.start(64 * KiB);
    await new Promise((r) => setTimeout(r, 100));
    expect(job.info().status).toBe('running');
    await job.cancel();
    const info = await job.wait();
    expect(info.error?.code).toBe('Cancelled');
    expect(t.live.current).toBe(t.src);
    expect(t.targetClosed).toBe(1);
    expect(t.removed).toBe(create ? 1 : 0);
    expect(t.attached).toEqual([job.id, undefined]);
    await t.stopWriter();
  });
});

describe('a group of mirrors (the disks of one VM)', () => {
  function group(failFlushOf?: number) {
    const { store, m } = jobManager();
    const size = 2 * MiB;
    const disks = [0, 1].map((i) => {
      const src = memoryDevice(size);
      const dst = memoryDevice(size);
      return { src, dst, live: new LiveDevice(src), model: new Uint8Array(size), switched: 0, undone: 0, i };
    });
    let stop = false;
    const writers = disks.map((d) => (async () => {
      for (let k = 0; !stop; k++) {
        const off = ((k * 31) % 30) * 64 * KiB;
        const data = new Uint8Array(4 * KiB).fill(1 + ((k + d.i * 7) % 250));
        await d.live.write(off, data);
        d.model.set(data, off);
        await new Promise((r) => setTimeout(r, 1));
      }
    })());
    const task = mirrorTask({ mode: 'background', pairs: disks.map((d) => ({ source: `pool/s${d.i}`, target: `pool/d${d.i}` })) }, {
      pairs: disks.map((d) => ({
        source: d.live,
        attach: () => undefined,
        detach: () => undefined,
        openTarget: async () => ({
          ...d.dst,
          close: async () => undefined,
          flush: async () => { if (failFlushOf === d.i && d.live.current === d.src && readyAll) throw new Error(`flush of pool/d${d.i} failed`); },
        }),
        identify: async () => ({}),
        prepareSwitch: async () => ({ done: async () => { d.switched++; }, undo: async () => { d.undone++; } }),
        changesSince: async () => [],
        markPoint: async () => undefined,
        dropSnapshot: async () => undefined,
        removeTarget: async () => undefined,
      })),
      failClosed: () => undefined,
      dropIntent: async () => undefined,
    });
    let readyAll = false;
    const job = m.start({ task, ref: 'pool/d0,pool/d1', executor: 'host', principal: ADMIN, locks: [] });
    return {
      m, store, disks, job, setReady: () => { readyAll = true; },
      stopWriters: async () => { stop = true; await Promise.all(writers); },
    };
  }

  it('ready when both are; complete switches both, after one record; every acknowledged write of each disk is on its target', async () => {
    const g = group();
    const job = await g.job;
    await untilStatus(g.m, job.id, 'ready');
    await job.complete();
    const info = await job.wait();
    expect(info.error).toBeUndefined();
    expect(((await g.store.getJob(job.id))!.checkpoint as MirrorState).authoritative).toBe('target');
    await g.stopWriters();
    for (const d of g.disks) {
      expect(d.live.current).not.toBe(d.src);
      expect(d.switched).toBe(1);
      expect(same(await d.dst.read(0, d.dst.sizeBytes), d.model)).toBe(true);
    }
  });

  it('all or none: a target that cannot be flushed at the switch-over fails the job and switches neither disk; the record says source', async () => {
    const g = group(1);
    const job = await g.job;
    await untilStatus(g.m, job.id, 'ready');
    g.setReady();
    await job.complete();
    const info = await job.wait();
    expect(info.error?.message).toMatch(/flush of pool\/d1 failed/);
    expect(((await g.store.getJob(job.id))!.checkpoint as MirrorState).authoritative).toBe('source');
    await g.stopWriters();
    for (const d of g.disks) {
      expect(d.live.current).toBe(d.src);
      expect(d.switched).toBe(0);
      expect(d.undone).toBe(1);
    }
  });
});


describe('a live copy suspended when its service stops', () => {
  function suspending(o: { point?: string; changesFail?: Promise<void> }) {
    const { store, m } = jobManager();
    const size = 4 * MiB;
    const src = memoryDevice(size);
    const dst = memoryDevice(size);
    const live = new LiveDevice(src);
    const calls: string[] = [];
    const task = mirrorTask({ mode: 'background', pairs: [{ source: 'pool/src', target: 'pool/dst', since: 'live-old', pending: [{ offset: 0, length: 64 * KiB }] }] }, {
      pairs: [plainPair(live, dst, {
        removeTarget: async () => void calls.push('removeTarget'),
        changesSince: async () => {
          if (o.changesFail) {
            await o.changesFail;
            throw new Error('the broker is closed'); // as when the service stops while the copy starts
          }
          return [];
        },
        markPoint: async () => {
          calls.push('markPoint');
          return o.point;
        },
        dropSnapshot: async (name) => void calls.push(`drop ${name}`),
      })],
      failClosed: () => undefined,
      dropIntent: async () => undefined,
      suspending: () => true,
    });
    const start = () => m.start({ task, ref: 'pool/src', executor: 'host', principal: ADMIN, locks: [{ key: 'pool/dst', mode: 'exclusive' }] });
    return { m, store, src, dst, live, calls, start };
  }

  it('stopped while its mirrors start (what changed since its point cannot be read any more), it is cancelled, not suspended: no point taken, the one it resumed from kept', async () => {
    let release!: () => void;
    const t = suspending({ point: 'live-new', changesFail: new Promise<void>((r) => (release = r)) });
    const job = await t.start();
    await job.cancel();
    release();
    const info = await job.wait();
    expect(info.error?.code).toBe('Cancelled');
    expect(info.suspended).toBeUndefined();
    expect(((await t.store.getJob(job.id))!.checkpoint as MirrorState).pending).toBeUndefined();
    expect(t.calls).toEqual([]);
  });

  it('ready, on a source that cannot take a point: not suspended, and the target is still a consistent copy (what was dirty copied first)', async () => {
    const t = suspending({});
    const job = await t.start();
    await untilStatus(t.m, job.id, 'ready');
    const data = new Uint8Array(4 * KiB).fill(0x5a);
    await t.live.write(MiB + 512, data); // dirty when the stop comes
    await job.cancel();
    const info = await job.wait();
    expect(info.error?.code).toBe('Cancelled');
    expect(info.suspended).toBeUndefined();
    expect(t.calls).toEqual(['markPoint']);
    expect(same(await t.dst.read(0, 4 * MiB), await t.src.read(0, 4 * MiB))).toBe(true);
  });

  it('suspended: the point and what the target lacks are recorded, the point it resumed from dropped', async () => {
    const t = suspending({ point: 'live-new' });
    const job = await t.start();
    await untilStatus(t.m, job.id, 'ready');
    await job.cancel();
    const info = await job.wait();
    expect(info).toMatchObject({ suspended: true, resumeSince: ['live-new'], error: { code: 'Cancelled', message: expect.stringMatching(/stopped with its service/) } });
    expect(((await t.store.getJob(job.id))!.checkpoint as MirrorState)).toMatchObject({ authoritative: 'source', points: ['live-new'], pending: [[]] });
    expect(t.calls).toEqual(['markPoint', 'drop live-old']);
  });
});

describe('a live copy\'s progress', () => {
  it('counts what reached the target, not what the speed limit let through before it was copied', async () => {
    const { store, m } = jobManager();
    const size = 4 * MiB;
    const src = memoryDevice(size);
    await src.write(0, new Uint8Array(size).fill(3));
    const dst = memoryDevice(size);
    let written = 0;
    const live = new LiveDevice(src);
    const task = mirrorTask({ mode: 'background', pairs: [{ source: 'pool/src', target: 'pool/dst' }] }, {
      pairs: [plainPair(live, { ...dst, write: async (o: number, d: Uint8Array) => { await dst.write(o, d); written += d.length; } })],
      failClosed: () => undefined,
      dropIntent: async () => undefined,
    });
    const job = await m.start({ task, ref: 'pool/src', executor: 'host', principal: ADMIN, locks: [{ key: 'pool/dst', mode: 'exclusive' }], speed: 4 * MiB });
    const seen: { current: number; written: number }[] = [];
    for (let i = 0; i < 400 && (await m.get(job.id)).info().status !== 'ready'; i++) {
      seen.push({ current: (await m.get(job.id)).info().progress.current, written });
      await new Promise((r) => setTimeout(r, 5));
    }
    expect(seen.length).toBeGreaterThan(20);
    expect(seen.filter((s) => s.current > s.written)).toEqual([]);
    // Written once when ready, then quiet: that copy is shown too (a report follows one skipped by the 100 ms rule).
    await live.write(0, new Uint8Array(64 * KiB).fill(4));
    await new Promise((r) => setTimeout(r, 250));
    expect((await m.get(job.id)).info().progress.current).toBe(written);
    await job.cancel();
    await job.wait();
  });
});

describe('a live copy whose runner lost the job (another runner took it over)', () => {
  for (const when of ['in its bulk pass', 'ready'] as const) it(`${when}: stops its mirror without a last copy or a point, closes its target writing nothing more, and keeps the target it made`, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'offload-mirror-lost-'));
    try {
      const t = setup('background', true, join(dir, 'jobs.sqlite'));
      const other = new SqliteStateStore(join(dir, 'jobs.sqlite'));
      try {
        const job = await t.start(when === 'ready' ? undefined : 256 * KiB); // slow: in the bulk pass for seconds
        if (when === 'ready') await untilStatus(t.m, job.id, 'ready');
        else for (let i = 0; i < 200 && (await t.store.getJob(job.id))!.progress.current === 0; i++) await new Promise((r) => setTimeout(r, 10));
        const rec = (await t.store.getJob(job.id))!;
        expect(await other.claimJob(job.id, { token: rec.runnerToken, fence: rec.fence, leaseExpires: rec.leaseExpires }, { pid: 1, token: 'elsewhere', host: 'other-host' }, Date.now() + 60_000)).toBe(rec.fence + 1);
        const e = (await job.wait().catch((x: unknown) => x)) as { message?: string };
        expect(e.message).toMatch(/taken over by another runner/);
        expect(t.removed).toBe(0);
        // A ready mirror would have copied what was dirty and taken a point of its source (stopAll).
        expect(t.points).toBe(0);
        expect(t.closedWith).toEqual([{ writeNothing: true }]);
      } finally {
        await t.stopWriter();
        await other.close();
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
