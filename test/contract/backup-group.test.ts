/**
 * A group backup (`backup A=SET_A B=SET_B`, `broker.backups.startGroup`): the disks of one VM in
 * one job, their points all of one instant. Each point restores to its source as it was; a guest
 * writing one disk then the other through this broker's exports never sees its later write in a
 * point without the earlier one; a group cancelled half-way keeps no point of either disk and the
 * next group is incremental again; bad groups are refused before anything is taken.
 */
import { describe, expect, it } from 'vitest';
import { createBroker, silentLogger, type Broker, type JobInfo } from '../../core/index.js';
import { builtinPlugins } from '../../plugins/index.js';
import { allBackendsForFile, patternBytes, withDevice, type AllBackends } from '../support/all-backends.js';
import { openExport, reply, request, CMD } from '../support/nbd-client.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

const bytes = (seed: number, length: number): Uint8Array => patternBytes(seed, 0, length);

describe('group backup: the disks of one VM at one instant', () => {
  let broker: Broker;
  let all: AllBackends;
  allBackendsForFile('offload-backup-group-', (a) => {
    all = a;
    broker = a.broker;
  });
  let n = 0;

  const read = (ref: string, size = SIZE) => withDevice(broker, ref, 'r', async (d) => Buffer.from(await d.read(0, size)));
  async function write(ref: string, at: [number, number, number][]): Promise<void> {
    await withDevice(broker, ref, 'rw', async (d) => {
      for (const [off, len, seed] of at) await d.write(off, bytes(seed, len));
      await d.flush();
    });
  }
  async function disks(...backends: string[]): Promise<string[]> {
    const refs = backends.map((b) => `${b}/grp-${++n}`);
    for (const [i, r] of refs.entries()) {
      await broker.volumes.create(r, { sizeBytes: SIZE });
      await write(r, [[0, 4 * MiB, i + 1], [9 * MiB, 2 * MiB, i + 5]]);
    }
    return refs;
  }
  const snapshotNames = async (ref: string) => (await broker.snapshots.list(ref)).map((s) => s.name).sort();

  it('local and san1 into san1 and nas1: one job; b1 full, b2 only the changes; each point restores to its disk as it was', async () => {
    const [a, b] = await disks('local', 'san1');
    const sets = [`san1/grp-set-${++n}`, `nas1/grp-set-${n}`];
    const pairs = [{ source: a!, to: sets[0]! }, { source: b!, to: sets[1]! }];
    const at1 = [await read(a!), await read(b!)];
    const job1 = await broker.backups.startGroup(pairs);
    expect(job1.info()).toMatchObject({ type: 'backup', ref: sets.join(',') });
    const first = await job1.wait();
    expect(first.error).toBeUndefined();
    expect(first.progress.total).toBeGreaterThanOrEqual(2 * 6 * MiB); // both full

    await write(a!, [[MiB, 64 * 1024, 7]]);
    await write(b!, [[12 * MiB, 64 * 1024, 8]]);
    const at2 = [await read(a!), await read(b!)];
    const second = await (await broker.backups.startGroup(pairs)).wait();
    expect(second.error).toBeUndefined();
    expect(second.progress.total).toBeLessThanOrEqual(2 * 4 * 64 * 1024); // only the changes, of both
    for (const [i, set] of sets.entries()) {
      expect((await broker.backups.list(set)).map((p) => p.ref)).toEqual([`${set}@b1`, `${set}@b2`]);
      // Each source keeps only the newest marker.
      expect((await snapshotNames(pairs[i]!.source)).filter((s) => s.startsWith('bk-'))).toHaveLength(1);
    }
    for (const [point, states] of [['b1', at1], ['b2', at2]] as const) {
      for (const [i, set] of sets.entries()) {
        const into = `local/grp-restored-${++n}`;
        expect((await (await broker.backups.restore(`${set}@${point}`, { to: into })).wait()).error).toBeUndefined();
        expect((await read(into)).equals(states[i]!)).toBe(true);
        await broker.volumes.delete(into);
      }
    }
  });

  for (const from of ['this broker', 'another broker (the markers taken by the one serving the disks)']) {
  it(`a guest writing disk A then disk B through exports: no point ever holds its write to B without the write to A before it; backed up from ${from}`, async () => {
    // Disks on two backends, the array's snapshot slow to come (150 ms before the mock takes it):
    // without the clients held, the guest writes both disks again between the two snapshots.
    const [a, b] = await disks('local', 'san1');
    const other = from === 'this broker' ? undefined : await createBroker(all.config, { plugins: builtinPlugins, logger: silentLogger });
    const backups = (other ?? broker).backups;
    all.san.faults.add({ method: 'POST', path: '/**/volume-snapshots', action: { type: 'latency', ms: 150 } });
    const sets = [`local/grp-ia-${++n}`, `nas1/grp-ib-${n}`];
    const exA = await broker.exports.start(a!, { listen: { port: 0 } });
    const exB = await broker.exports.start(b!, { listen: { port: 0 } });
    const ca = await openExport(Number(new URL(exA.uri).port), exA.name);
    const cb = await openExport(Number(new URL(exB.uri).port), exB.name);
    // Sequence number k to A's first block, acknowledged, then k to B's: a dependent pair of writes.
    let seq = 0;
    let stop = false;
    const block = (k: number) => {
      const buf = Buffer.alloc(4096);
      buf.writeUInt32LE(k, 0);
      return buf;
    };
    for (const c of [ca, cb]) {
      request(c.wire, CMD.WRITE, 0, 4096, { payload: block(0) });
      expect((await reply(c.wire)).error).toBe(0);
    }
    const guest = (async () => {
      while (!stop) {
        seq++;
        for (const c of [ca, cb]) {
          request(c.wire, CMD.WRITE, 0, 4096, { payload: block(seq) });
          expect((await reply(c.wire)).error).toBe(0);
        }
      }
    })();
    try {
      for (let round = 0; round < (other ? 2 : 4); round++) {
        const info = await (await backups.startGroup([{ source: a!, to: sets[0]! }, { source: b!, to: sets[1]! }])).wait();
        expect(info.error).toBeUndefined();
        const [inA, inB] = [(await read(sets[0]!, 4096)).readUInt32LE(0), (await read(sets[1]!, 4096)).readUInt32LE(0)];
        expect(inA).toBeGreaterThan(0);
        // A is written first: at one instant A holds k and B holds k or k - 1.
        expect(inA - inB === 0 || inA - inB === 1, `round ${round}: A holds ${inA}, B holds ${inB}`).toBe(true);
      }
    } finally {
      all.san.faults.clear();
      stop = true;
      await guest;
      for (const c of [ca, cb]) {
        request(c.wire, CMD.DISC, 0, 0);
        c.wire.socket.end();
      }
      await exA.stop();
      await exB.stop();
      await other?.close();
    }
    expect(seq).toBeGreaterThan(4); // the guest wrote throughout
    // Each source keeps only the newest marker (the previous ones deleted through the serving broker).
    for (const d of [a!, b!]) expect((await snapshotNames(d)).filter((x) => x.startsWith('bk-'))).toHaveLength(1);
  });
  }

  it('disks in use in two processes: Busy, as one instant cannot span the guests of two; no marker is left', async () => {
    const [a, b] = await disks('local', 'san1');
    const other = await createBroker(all.config, { plugins: builtinPlugins, logger: silentLogger });
    const exA = await broker.exports.start(a!, { listen: { port: 0 } });
    const exB = await other.exports.start(b!, { listen: { port: 0 } });
    try {
      const refused = await broker.backups.startGroup([{ source: a!, to: `local/grp-two-${++n}` }, { source: b!, to: `nas1/grp-two-${n}` }]).then(() => undefined, (e: Error & { code?: string }) => e);
      expect(refused?.code).toBe('Busy');
      expect(refused?.message).toMatch(/served by more than one process/);
      for (const d of [a!, b!]) expect((await snapshotNames(d)).filter((x) => x.startsWith('bk-'))).toEqual([]);
    } finally {
      await exA.stop();
      await exB.stop();
      await other.close();
    }
  });

  it('cancelled half-way: neither disk keeps a new point or marker, both sets read as their last point; the next group is incremental again', async () => {
    const [a, b] = await disks('local', 'nas1');
    const sets = [`san1/grp-cx-${++n}`, `local/grp-cy-${n}`];
    const pairs = [{ source: a!, to: sets[0]! }, { source: b!, to: sets[1]! }];
    expect((await (await broker.backups.startGroup(pairs)).wait()).error).toBeUndefined();
    const b1 = [await read(sets[0]!), await read(sets[1]!)];
    const markers = [await snapshotNames(a!), await snapshotNames(b!)];
    await write(a!, [[0, 6 * MiB, 21]]);
    await write(b!, [[0, 6 * MiB, 22]]);
    const job = await broker.backups.startGroup(pairs, { speed: 8 * MiB });
    // Cancelled once the second disk's copy has begun: the first disk's copy is done by then.
    let info: JobInfo = job.info();
    for (let i = 0; i < 1000 && !(info.progress.current > 6 * MiB); i++) {
      await new Promise((r) => setTimeout(r, 10));
      info = (await broker.jobs.get(job.id)).info();
    }
    expect(info.progress.current).toBeGreaterThan(6 * MiB);
    await broker.jobs.cancel(job.id);
    expect((await job.wait()).error?.code).toBe('Cancelled');
    for (const [i, set] of sets.entries()) {
      expect((await broker.backups.list(set)).map((p) => p.ref)).toEqual([`${set}@b1`]);
      expect((await read(set)).equals(b1[i]!)).toBe(true);
    }
    expect([await snapshotNames(a!), await snapshotNames(b!)]).toEqual(markers);
    const again = await (await broker.backups.startGroup(pairs)).wait();
    expect(again.error).toBeUndefined();
    expect(again.progress.total).toBeLessThanOrEqual(2 * 6 * MiB + 2 * MiB); // the changes, not everything again
    expect((await broker.backups.list(sets[0]!)).map((p) => p.ref)).toEqual([`${sets[0]}@b1`, `${sets[0]}@b2`]);
  });

  it('a point that the array refuses for the second disk: the first disk\'s set (made by this job, with its point) is removed too, and both markers dropped', async () => {
    const [a, b] = await disks('local', 'local');
    const sets = [`san1/grp-fa-${++n}`, `san1/grp-fb-${n}`];
    all.san.faults.add({ method: 'POST', path: '/**/volume-snapshots', nth: [2], action: { type: 'status', status: 400 } });
    try {
      const info = await (await broker.backups.startGroup([{ source: a!, to: sets[0]! }, { source: b!, to: sets[1]! }])).wait();
      expect(info.error).toBeDefined();
    } finally {
      all.san.faults.clear();
    }
    for (const set of sets) await expect(broker.volumes.get(set)).rejects.toMatchObject({ code: 'NotFound' });
    expect([await snapshotNames(a!), await snapshotNames(b!)]).toEqual([[], []]);
    expect((await (await broker.backups.startGroup([{ source: a!, to: sets[0]! }, { source: b!, to: sets[1]! }])).wait()).error).toBeUndefined();
  });

  it('an array slow to take its snapshot: the guests are held no longer than the limit, the group fails with Timeout and no marker is left', async () => {
    const [a, b] = await disks('local', 'san1');
    const exA = await broker.exports.start(a!, { listen: { port: 0 } });
    all.san.faults.add({ method: 'POST', path: '/**/volume-snapshots', action: { type: 'latency', ms: 1500 } });
    process.env.OFFLOAD_MARKER_HOLD_MS = '300';
    const ca = await openExport(Number(new URL(exA.uri).port), exA.name);
    try {
      let settled = false;
      const started = broker.backups.startGroup([{ source: a!, to: `local/grp-ta-${++n}` }, { source: b!, to: `local/grp-tb-${n}` }]);
      started.then(() => (settled = true), () => (settled = true));
      // Once the array has the snapshot request (the guests held from before it), a guest write:
      // answered after the limit, before the array's answer (and the group's end) comes.
      while (all.san.faults.list()[0]!.calls === 0) await new Promise((r) => setTimeout(r, 5));
      request(ca.wire, CMD.WRITE, 0, 4096, { payload: Buffer.alloc(4096, 9) });
      expect((await reply(ca.wire)).error).toBe(0);
      expect(settled).toBe(false);
      await expect(started).rejects.toMatchObject({ code: 'Timeout' });
    } finally {
      delete process.env.OFFLOAD_MARKER_HOLD_MS;
      all.san.faults.clear();
      request(ca.wire, CMD.DISC, 0, 0);
      ca.wire.socket.end();
      await exA.stop();
    }
    expect([await snapshotNames(a!), await snapshotNames(b!)]).toEqual([[], []]);
  });

  it('refused before anything is taken: no pairs, a volume twice, a set that is another pair\'s disk, a set that is not a backup', async () => {
    const [a, b] = await disks('local', 'local');
    const before = [await snapshotNames(a!), await snapshotNames(b!)];
    await expect(broker.backups.startGroup([])).rejects.toMatchObject({ code: 'InvalidArgument' });
    await expect(broker.backups.startGroup([{ source: a!, to: `local/s1-${++n}` }, { source: a!, to: `local/s2-${n}` }])).rejects.toMatchObject({ code: 'InvalidArgument', message: expect.stringMatching(/appears twice/) });
    await expect(broker.backups.startGroup([{ source: a!, to: `local/s1-${++n}` }, { source: b!, to: `local/s1-${n}` }])).rejects.toMatchObject({ code: 'InvalidArgument', message: expect.stringMatching(/appears twice/) });
    await expect(broker.backups.startGroup([{ source: a!, to: `local/s1-${++n}` }, { source: `local/s1-${n}`, to: b! }])).rejects.toMatchObject({ code: 'InvalidArgument' });
    await expect(broker.backups.startGroup([{ source: a!, to: `local/s1-${++n}` }, { source: b!, to: a! }])).rejects.toMatchObject({ code: 'InvalidArgument' });
    await expect(broker.backups.startGroup([{ source: a!, to: `local/s1-${++n}` }, { source: b!, to: b! }])).rejects.toMatchObject({ code: 'InvalidArgument' });
    const plain = `local/plain-${++n}`;
    await broker.volumes.create(plain, { sizeBytes: MiB });
    await expect(broker.backups.startGroup([{ source: a!, to: `local/s1-${++n}` }, { source: b!, to: plain }])).rejects.toMatchObject({ code: 'AlreadyExists' });
    await expect(broker.backups.startGroup([{ source: a!, to: 'nowhere/x' }])).rejects.toMatchObject({ code: 'NotFound' });
    expect([await snapshotNames(a!), await snapshotNames(b!)]).toEqual(before);
  });
});
