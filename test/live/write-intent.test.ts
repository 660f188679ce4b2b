/**
 * The write-intent record of a live copy (core/live/write-intent.ts) and its guard on the source
 * (LiveDevice.setGuard / holdWrites): a write lands only once a saved record names its region; a
 * region leaves the record only after the target's flush, and never while written or copied.
 */
import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { ADMIN, LockManager, silentLogger, type BlockDevice } from '../../core/index.js';
import { JobManager } from '../../core/jobs/job-manager.js';
import { HOST } from '../../core/jobs/runner.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';
import { LiveDevice } from '../../core/live/live-device.js';
import { checkIntentRecord, IntentLog, intentRanges, regionBytesFor, type IntentRecord } from '../../core/live/write-intent.js';
import { dropWriteIntent, mirrorAfterRestart, mirrorTask, type MirrorState } from '../../core/live/mirror-task.js';
import { recordToInfo } from '../../core/jobs/remote-job.js';
import type { JobRecord } from '../../core/state/records.js';
import { memoryDevice } from '../support/memory-device.js';
import { jobManager, plainPair } from '../support/mirror-jobs.js';

const MiB = 1024 * 1024;

/** A log whose saves are recorded (and can be made to wait or fail). */
function recordingLog() {
  const saved: IntentRecord[][] = [];
  let gate: Promise<void> | undefined;
  let failWith: Error | undefined;
  let drops = 0;
  let dropFails: Error | undefined;
  const log = new IntentLog(async (records) => {
    await gate;
    if (failWith) throw failWith;
    saved.push(records);
  }, async () => {
    drops++;
    if (dropFails) throw dropFails;
  });
  return {
    log, saved,
    hold() {
      let open!: () => void;
      gate = new Promise<void>((r) => { open = r; });
      return () => { gate = undefined; open(); };
    },
    fail(e: Error | undefined) { failWith = e; },
    failDrop(e: Error | undefined) { dropFails = e; },
    get drops() { return drops; },
  };
}

const named = (rec: IntentRecord | undefined) => (rec ? intentRanges(rec) : []);

describe('write-intent record', () => {
  it('a write to a recorded region goes at once; one to a region trimmed away waits for a save naming it, shared by every write waiting then', async () => {
    const t = recordingLog();
    const d = t.log.add(8 * MiB, 'all');
    await t.log.save();
    expect(named(t.saved[0]![0])).toEqual([{ offset: 0, length: 8 * MiB }]);
    expect(d.begin(100, 4096)).toBeUndefined();
    d.end(100, 4096);
    // Regions 2–7 in sync and idle through a trim: they leave the record.
    const clean = (_: number, o: number) => o >= 2 * MiB;
    let flushed = 0;
    await t.log.trim(async () => { flushed++; }, clean);
    expect(flushed).toBeGreaterThan(0);
    expect(named(t.saved.at(-1)![0])).toEqual([{ offset: 0, length: 2 * MiB }]);
    const before = t.saved.length;
    const release = t.hold();
    const waits = [3, 4, 5, 3, 6].map((r) => d.begin(r * MiB + 512, 512));
    expect(waits.every((w) => w instanceof Promise)).toBe(true);
    let landed = 0;
    for (const w of waits) void w!.then(() => landed++);
    await new Promise((r) => setTimeout(r, 20));
    expect(landed).toBe(0); // not before the record names them
    release();
    await Promise.all(waits);
    expect(t.saved.length - before).toBeLessThanOrEqual(2);
    expect(named(t.saved.at(-1)![0])).toEqual([{ offset: 0, length: 2 * MiB }, { offset: 3 * MiB, length: 4 * MiB }]);
  });

  it('a trim keeps a region written while the target flushed, one a write or a copy is in flight in, and one not in sync', async () => {
    const t = recordingLog();
    const d = t.log.add(4 * MiB, 'all');
    await t.log.save();
    await t.log.trim(async () => undefined, () => false); // nothing in sync yet
    d.begin(0, 512); // a write in flight in region 0 (not ended)
    d.copying(MiB, 512); // a copy in flight in region 1
    const notInSync = (_: number, o: number) => o !== 3 * MiB;
    // Region 2 is written (and ends) while the target flushes.
    await t.log.trim(async () => {
      void d.begin(2 * MiB, 512);
      d.end(2 * MiB, 512);
    }, notInSync);
    // Nothing left the record: 0 and 1 busy, 2 touched during the flush, 3 dirty.
    expect(named(t.saved.at(-1)![0])).toEqual([{ offset: 0, length: 4 * MiB }]);
    d.end(0, 512);
    d.end(MiB, 512);
    await t.log.trim(async () => undefined, () => true);
    await t.log.trim(async () => undefined, () => true);
    expect(named(t.saved.at(-1)![0])).toEqual([]);
  });

  it('a region written again after it left stays longer next time: 8 trims, then twice as many at each return', async () => {
    const t = recordingLog();
    const d = t.log.add(MiB, 'all');
    await t.log.save();
    const trims = async (k: number) => { for (let i = 0; i < k; i++) await t.log.trim(async () => undefined, () => true); };
    await trims(1);
    expect(named(t.saved.at(-1)![0])).toEqual([]); // copied, idle: out after one trim
    await d.begin(0, 512);
    d.end(0, 512);
    await trims(8);
    expect(named(t.saved.at(-1)![0])).toEqual([{ offset: 0, length: MiB }]); // touched at the first of those: 7 idle trims so far
    await trims(1);
    expect(named(t.saved.at(-1)![0])).toEqual([]);
    await d.begin(0, 512);
    d.end(0, 512);
    await trims(16);
    expect(named(t.saved.at(-1)![0])).toEqual([{ offset: 0, length: MiB }]);
    await trims(1);
    expect(named(t.saved.at(-1)![0])).toEqual([]);
  });

  it('a save that fails fails the writes waiting for it; through a LiveDevice, such a write never lands', async () => {
    const t = recordingLog();
    const src = memoryDevice(4 * MiB);
    const live = new LiveDevice(src);
    const d = t.log.add(4 * MiB, []);
    await t.log.save();
    const unguard = live.setGuard(d);
    t.fail(new Error('the store is unreachable'));
    await expect(live.write(MiB, new Uint8Array(512).fill(7))).rejects.toThrow(/unreachable/);
    expect((await src.read(MiB, 512)).every((b) => b === 0)).toBe(true);
    t.fail(undefined);
    await live.write(MiB, new Uint8Array(512).fill(7));
    expect((await src.read(MiB, 512))[0]).toBe(7);
    expect(named(t.saved.at(-1)![0])).toEqual([{ offset: MiB, length: MiB }]);
    unguard();
  });

  it('closed: writes wait for the last record; if it fails, the intent is dropped for them, tried again while that fails', async () => {
    const t = recordingLog();
    const d = t.log.add(4 * MiB, []);
    await t.log.save();
    let last!: () => void;
    const closing = t.log.close(() => new Promise<void>((r) => { last = r; }));
    const w = d.begin(0, 512)!;
    let went = false;
    void w.then(() => { went = true; });
    await new Promise((r) => setTimeout(r, 10));
    expect(went).toBe(false);
    last();
    await closing;
    await w;
    expect(t.drops).toBe(0);

    const u = recordingLog();
    const e = u.log.add(4 * MiB, []);
    await u.log.save();
    u.failDrop(new Error('still unreachable'));
    await expect(u.log.close(async () => { throw new Error('the last record failed'); })).rejects.toThrow(/last record/);
    await expect(e.begin(0, 512)!).rejects.toThrow(/still unreachable/);
    expect(u.drops).toBe(1);
    u.failDrop(undefined);
    await e.begin(MiB, 512);
    expect(u.drops).toBe(2);
    expect(e.begin(2 * MiB, 512) === undefined || await e.begin(2 * MiB, 512) === undefined).toBe(true);
    expect(u.drops).toBe(2); // dropped once: every later write goes on
  });

  it('a LiveDevice holding its writes lets reads through, and the writes go once a guard is set (or the hold ends)', async () => {
    const src = memoryDevice(4 * MiB);
    const live = new LiveDevice(src);
    let end!: () => void;
    live.holdWrites(new Promise<void>((r) => { end = r; }));
    let written = false;
    const w = live.write(0, new Uint8Array(512).fill(9)).then(() => { written = true; });
    expect((await live.read(0, 512))[0]).toBe(0);
    await new Promise((r) => setTimeout(r, 10));
    expect(written).toBe(false);
    expect(live.writesHeld).toBe(true);
    const t = recordingLog();
    const d = t.log.add(4 * MiB, 'all');
    await t.log.save();
    live.setGuard(d);
    await w;
    expect(live.writesHeld).toBe(false);
    end();

    const other = new LiveDevice(memoryDevice(MiB));
    let fail!: (e: Error) => void;
    other.holdWrites(new Promise<void>((_, reject) => { fail = reject; }));
    const refused = other.write(0, new Uint8Array(512));
    fail(new Error('the export stops'));
    await expect(refused).rejects.toThrow(/export stops/);
  });

  it('records: regions of at least 1 MiB, at most 16384 per disk; ranges coalesce; a record that does not fit the disk is refused', () => {
    expect(regionBytesFor(8 * MiB)).toBe(MiB);
    expect(regionBytesFor(64 * 1024 * MiB)).toBe(4 * MiB);
    const t = recordingLog();
    const d = t.log.add(5 * MiB + 512, [{ offset: 0, length: 1 }, { offset: MiB, length: MiB }, { offset: 5 * MiB, length: 512 }]);
    const rec = d.record();
    expect(intentRanges(rec)).toEqual([{ offset: 0, length: 2 * MiB }, { offset: 5 * MiB, length: 512 }]);
    expect(checkIntentRecord(rec, 5 * MiB + 512, 'pool/a')).toEqual(rec);
    expect(() => checkIntentRecord(rec, 6 * MiB, 'pool/a')).toThrow(/does not fit its 6291456 bytes/);
    expect(() => checkIntentRecord({ ...rec, bits: 'AAAAAAAA' }, 5 * MiB + 512, 'pool/a')).toThrow(/InvalidArgument|does not fit/);
  });

  it('after its runner stopped, a mirror job keeps its write-intent record only if that process is known gone', () => {
    const intent = [{ sizeBytes: MiB, regionBytes: MiB, bits: 'AQ==' }];
    const rec = {
      id: 'mirror-1', type: 'mirror', params: { mode: 'background', pairs: [{ source: 'pool/a', target: 'san/a' }] }, checkpoint: { authoritative: 'source', intent } satisfies MirrorState,
    } as unknown as JobRecord;
    const gone = mirrorAfterRestart(rec, { host: 'h', pid: 12, gone: true });
    expect(gone.why).toMatch(/pool\/a holds the data.*goes on from its write-intent record/);
    expect('checkpoint' in gone).toBe(false);
    const alive = mirrorAfterRestart(rec, { host: 'other', pid: 12, gone: false });
    expect(alive.checkpoint).toEqual({ authoritative: 'source' });
    expect(alive.why).toMatch(/pool\/a holds the data and stays current; san\/a is behind/);
    const switched = mirrorAfterRestart({ ...rec, checkpoint: { authoritative: 'target' } } as JobRecord, { host: 'h', pid: 12, gone: true });
    expect(switched.succeeded).toBe(true);
  });

  it('taken over, a mirror job keeps its write-intent record only if its runner ran on this host and its process is gone', async () => {
    const store = new SqliteStateStore(':memory:');
    const jobs = new JobManager(store, new LockManager(), async (rec, stopped) => mirrorAfterRestart(rec, stopped), silentLogger);
    const checkpoint = { authoritative: 'source', intent: [{ sizeBytes: MiB, regionBytes: MiB, bits: 'AQ==' }] };
    const now = new Date().toISOString();
    const rec = (id: string, over: Partial<JobRecord>): JobRecord => ({
      id, type: 'mirror', status: 'running', executor: 'host', ref: 'san/a', owner: 'admin', ownerRole: 'admin', progress: { current: 0, total: 1 }, speed: 0,
      cancelled: false, params: { mode: 'background', pairs: [{ source: 'pool/a', target: 'san/a' }] }, createdAt: now, updatedAt: now, checkpoint,
      runnerPid: 1, runnerToken: `tok-${id}`, runnerHost: HOST, leaseExpires: Date.now() + 60_000, seenAt: Date.now(), fence: 1, locks: [], ...over,
    });
    try {
      const deadPid = spawnSync(process.execPath, ['-e', '0']).pid!;
      await store.insertJob(rec('mirror-died-here', { runnerPid: deadPid }));
      await store.insertJob(rec('mirror-elsewhere', { runnerHost: 'other-host', leaseExpires: Date.now() - 1 }));
      await jobs.recover();
      expect(await store.getJob('mirror-died-here')).toMatchObject({ status: 'concluded', checkpoint });
      expect(await store.getJob('mirror-elsewhere')).toMatchObject({ status: 'concluded', checkpoint: { authoritative: 'source' } });
    } finally {
      await jobs.close();
      await store.close();
    }
  });

  it('a write lands only while the saved record names its region: a second write into a region a trim is taking out waits too', async () => {
    const saved: IntentRecord[][] = [];
    let gate: Promise<void> | undefined;
    let inFlight: IntentRecord[] | undefined;
    const log = new IntentLog(async (records) => {
      inFlight = records;
      await gate;
      saved.push(records);
    }, async () => undefined);
    const d = log.add(4 * MiB, 'all');
    await log.save();
    // Regions 1–3 in sync and idle: a trim drops them; its save is held in flight.
    let open!: () => void;
    gate = new Promise<void>((r) => { open = r; });
    void log.trim(async () => undefined, (_i, o) => o >= MiB);
    await new Promise((r) => setTimeout(r, 5));
    expect(intentRanges(inFlight![0]!)).toEqual([{ offset: 0, length: MiB }]);
    // The guest writes region 1 twice meanwhile: neither may land before a record names it again.
    const a = d.begin(MiB, 512);
    const b = d.begin(MiB + 4096, 512);
    expect(a).toBeInstanceOf(Promise);
    expect(b).toBeInstanceOf(Promise);
    let landed = false;
    void b!.then(() => { landed = true; });
    gate = new Promise<void>(() => undefined); // the next save (the one they wait for) never ends: a crash here
    open();
    await new Promise((r) => setTimeout(r, 5));
    expect(intentRanges(saved.at(-1)![0]!)).toEqual([{ offset: 0, length: MiB }]);
    expect(landed).toBe(false);
  });
});

describe('a live copy\'s write-intent record as the job ends', () => {
  it('a copy that fails concludes without it (else a restart would resume from a record the writes since have outgrown)', async () => {
    const { store, m } = jobManager();
    const src = memoryDevice(4 * MiB);
    await src.write(3 * MiB, new Uint8Array(MiB).fill(5)); // only region 3 to copy
    const live = new LiveDevice(src);
    let failCopy!: (e: Error) => void;
    const stuck = new Promise<void>((_, reject) => { failCopy = reject; });
    const target: BlockDevice = { ...memoryDevice(4 * MiB), write: async () => stuck, writeZeroes: undefined, close: async () => undefined };
    const task = mirrorTask({ mode: 'background', pairs: [{ source: 'pool/src', target: 'pool/dst' }] }, {
      pairs: [plainPair(live, target)], failClosed: () => undefined, dropIntent: (id) => dropWriteIntent(store, id), trimEveryMs: { ready: 1000, bulk: 1000 },
    });
    const job = await m.start({ task, ref: 'pool/src', executor: 'host', principal: ADMIN, locks: [{ key: 'pool/dst', mode: 'exclusive' }] });
    await new Promise((r) => setTimeout(r, 1500)); // a trim drops regions 0–2 (in sync, idle)
    const during = (await store.getJob(job.id))!.checkpoint as MirrorState;
    expect(intentRanges(during.intent![0]!)).toEqual([{ offset: 3 * MiB, length: MiB }]);
    failCopy(new Error('target I/O error'));
    expect((await job.wait()).error?.message).toMatch(/target I\/O error/);
    await live.write(0, new Uint8Array(4096).fill(9)); // unguarded now: not in any record
    const rec = (await store.getJob(job.id))!;
    expect({ intent: (rec.checkpoint as MirrorState).intent, crashed: recordToInfo(rec).crashed }).toEqual({ intent: undefined, crashed: undefined });
  });

  it('its guard stays while the record cannot be written, and goes once a later write gets the intent dropped: the source can be copied again', async () => {
    const { m } = jobManager();
    const live = new LiveDevice(memoryDevice(4 * MiB));
    let storeDown = true;
    const dropIntent = async () => { if (storeDown) throw new Error('store unreachable'); };
    const mk = () => mirrorTask({ mode: 'background', pairs: [{ source: 'pool/src', target: 'pool/dst' }] }, {
      pairs: [plainPair(live, { ...memoryDevice(4 * MiB), close: async () => undefined })], failClosed: () => undefined, dropIntent,
    });
    const first = await m.start({ task: mk(), ref: 'pool/src', executor: 'host', principal: ADMIN, locks: [], speed: 1 });
    await new Promise((r) => setTimeout(r, 50));
    await first.cancel();
    await first.wait().catch(() => undefined);
    storeDown = false;
    await live.write(0, new Uint8Array(512).fill(1)); // its wait drops the intent: the write goes, the guard with it
    const second = await m.start({ task: mk(), ref: 'pool/src', executor: 'host', principal: ADMIN, locks: [] });
    await new Promise((r) => setTimeout(r, 300));
    expect(second.info().error?.message ?? second.info().status).not.toMatch(/write guard already/);
    await second.cancel();
  });

  it('a copy whose first record cannot be saved fails, and does not conclude as one whose service died', async () => {
    const { store, m } = jobManager();
    const live = new LiveDevice(memoryDevice(4 * MiB));
    const update = store.updateJob.bind(store);
    let blips = 0;
    store.updateJob = async (rec) => {
      // A short store blip: the writes carrying the first record fail.
      if (blips < 2 && (rec.checkpoint as MirrorState | undefined)?.intent !== undefined) {
        blips++;
        throw new Error('store blip');
      }
      return update(rec);
    };
    const task = mirrorTask({ mode: 'background', pairs: [{ source: 'pool/src', target: 'pool/dst' }] }, {
      pairs: [plainPair(live, { ...memoryDevice(4 * MiB), close: async () => undefined })], failClosed: () => undefined, dropIntent: (id) => dropWriteIntent(store, id),
    });
    const job = await m.start({ task, ref: 'pool/src', executor: 'host', principal: ADMIN, locks: [] });
    await job.wait().catch(() => undefined);
    const rec = (await store.getJob(job.id))!;
    expect({ failed: blips > 0, status: rec.status, error: rec.error?.message, crashed: recordToInfo(rec).crashed })
      .toEqual({ failed: true, status: 'concluded', error: expect.stringMatching(/store blip/), crashed: undefined });
  });

  it('a copy whose lease lapsed as it failed is given up, not concluded with the record a later write had dropped', async () => {
    const { store, m } = jobManager();
    const src = memoryDevice(4 * MiB);
    await src.write(3 * MiB, new Uint8Array(MiB).fill(5));
    const live = new LiveDevice(src);
    let failCopy!: (e: Error) => void;
    const stuck = new Promise<void>((_, reject) => { failCopy = reject; });
    let openClose!: () => void;
    const closeGate = new Promise<void>((r) => { openClose = r; });
    const target: BlockDevice = { ...memoryDevice(4 * MiB), write: async () => stuck, writeZeroes: undefined, close: async () => closeGate };
    const task = mirrorTask({ mode: 'background', pairs: [{ source: 'pool/src', target: 'pool/dst' }] }, {
      pairs: [plainPair(live, target)], failClosed: () => undefined, dropIntent: (id) => dropWriteIntent(store, id), trimEveryMs: { ready: 1000, bulk: 1000 },
    });
    const job = await m.start({ task, ref: 'pool/src', executor: 'host', principal: ADMIN, locks: [{ key: 'pool/dst', mode: 'exclusive' }] });
    await new Promise((r) => setTimeout(r, 1500)); // regions 0–2 trimmed away; region 3 being copied (stuck)
    expect(intentRanges(((await store.getJob(job.id))!.checkpoint as MirrorState).intent![0]!)).toEqual([{ offset: 3 * MiB, length: MiB }]);
    // The runner stalled past its lease; the renewal has not come yet.
    (job as unknown as { record: { leaseExpires: number } }).record.leaseExpires = Date.now() - 1;
    failCopy(new Error('target I/O error'));
    await new Promise((r) => setTimeout(r, 50)); // the job's last record was refused; it closes its target
    await live.write(0, new Uint8Array(4096).fill(9)); // region 0: its wait drops the intent in the store, then it lands
    expect(((await store.getJob(job.id))!.checkpoint as MirrorState).intent).toBeUndefined();
    openClose();
    await job.wait().catch(() => undefined);
    const rec = (await store.getJob(job.id))!;
    // Not concluded by this runner (whoever takes it over concludes it), and no record to resume from.
    expect({ status: rec.status, intent: (rec.checkpoint as MirrorState).intent, crashed: recordToInfo(rec).crashed }).toEqual({ status: 'running', intent: undefined, crashed: undefined });
  });
});
