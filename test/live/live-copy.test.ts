/**
 * `broker.copy(SRC, DST, { live: true })` end to end, on real backends: the source exported over
 * NBD and written by clients (an in-process writer with a model of every acknowledged write, and
 * qemu-io) while the live copy runs, within a backend and across them — pool → SAN mock, SAN mock
 * → NAS mock, NAS mock → pool. Complete switches the export over under its open connections; the
 * target then equals the model, and no read was stale. Also: the locks during the job, `nbd stop`
 * refused or forced, cancel before and after ready, and a tenant's export under an
 * administrator's migration.
 */
import { describe, expect, it } from 'vitest';
import { createBroker, silentLogger, type Broker, type ExportHandle, type Job, type JobStatus } from '../../core/index.js';
import { builtinPlugins } from '../../plugins/index.js';
import { allBackendsForFile, withDevice, type AllBackends } from '../support/all-backends.js';
import { NbdWriter, qemuIoWrites } from '../support/nbd-writer.js';
import { HAVE, qemuIo } from '../support/nbd-tools.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

let all: AllBackends;
let broker: Broker;
let n = 0;

allBackendsForFile('offload-live-', (a) => {
  all = a;
  broker = a.broker;
});

/** A new volume with data in its first half (every 64 KiB block's first 32 KiB), and its bytes. */
async function sourceVolume(backend: string, b: Broker = broker): Promise<{ ref: string; bytes: Buffer }> {
  const ref = `${backend}/live-src-${++n}`;
  await b.volumes.create(ref, { sizeBytes: SIZE });
  const bytes = Buffer.alloc(SIZE);
  await withDevice(b, ref, 'rw', async (d) => {
    for (let off = 0; off < SIZE / 2; off += 64 * 1024) {
      const chunk = Buffer.alloc(32 * 1024, (off / (64 * 1024)) % 200 + 7);
      await d.write(off, chunk);
      chunk.copy(bytes, off);
    }
    await d.flush();
  });
  return { ref, bytes };
}

function portOf(h: ExportHandle): number {
  return Number(new URL(h.uri).port);
}

async function untilStatus(job: Job, status: JobStatus, b: Broker = broker): Promise<void> {
  for (let i = 0; i < 3000; i++) {
    const info = (await b.jobs.get(job.id)).info();
    if (info.status === status) return;
    if (info.status === 'concluded') throw new Error(`job ${job.id} concluded instead of reaching ${status}: ${JSON.stringify(info.error)}`);
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`job ${job.id} never reached ${status}`);
}

async function readAll(ref: string): Promise<Buffer> {
  return withDevice(broker, ref, 'r', async (d) => Buffer.from(await d.read(0, SIZE)));
}

describe('live copy through the broker', () => {
  const PAIRS: [string, string, 'background' | 'write-blocking'][] = [
    ['local', 'san1', 'background'],
    ['san1', 'nas1', 'write-blocking'],
    ['nas1', 'local', 'background'],
    ['local', 'local', 'write-blocking'],
  ];
  for (const [from, to, mode] of PAIRS) {
    it(`${from} → ${to} (${mode}) while written: ready, complete switches the export over under open connections, the target holds every acknowledged write`, async () => {
      const src = await sourceVolume(from);
      const dst = `${to}/live-dst-${++n}`;
      const exp = await broker.exports.start(src.ref, { listen: { port: 0 } });
      const switched: string[] = [];
      exp.onRetarget((r) => switched.push(r));
      // Two guests on disjoint ranges: the in-process writer below 12 MiB, qemu-io above it.
      const writer = await NbdWriter.start({ port: portOf(exp), name: exp.name, connections: 3, span: 12 * MiB }, src.bytes);
      const job = await broker.copy(src.ref, dst, { live: true, mode });
      const qemu = HAVE.qemu ? qemuIoWrites(exp.uri, 12 * MiB, 64) : Promise.resolve([]);
      expect(job.info().type).toBe('mirror');
      await untilStatus(job, 'ready');
      expect(job.info().authoritative).toEqual({ side: 'source', ref: src.ref });
      expect((await broker.exports.list()).find((e) => e.name === exp.name)?.liveJob).toBe(job.id);
      const atReady = writer.acked;
      await new Promise((r) => setTimeout(r, 150));
      expect(writer.acked).toBeGreaterThan(atReady); // writes go on while ready
      await broker.jobs.complete(job.id);
      const done = await job.wait();
      expect(done.error).toBeUndefined();
      expect(done.authoritative).toEqual({ side: 'target', ref: dst });
      const afterPivot = writer.acked;
      await new Promise((r) => setTimeout(r, 150));
      await writer.stop(); // no NBD error, no stale read on the connections that stayed open
      for (const w of await qemu) w.data.copy(writer.model, w.offset);
      expect(writer.acked).toBeGreaterThan(afterPivot);
      expect(writer.readBacks).toBeGreaterThan(0);
      const listed = (await broker.exports.list()).find((e) => e.name === exp.name);
      expect(listed?.ref).toBe(dst);
      expect(listed?.liveJob).toBeUndefined();
      expect(switched).toEqual([dst]);
      // The source is released (its lock went with the switch): deleting it works; the target is held by the export.
      await broker.volumes.delete(src.ref);
      await expect(broker.volumes.delete(dst)).rejects.toMatchObject({ code: 'Busy' });
      await exp.stop();
      expect((await readAll(dst)).equals(writer.model)).toBe(true);
      await broker.volumes.delete(dst);
    });
  }

  for (const from of ['this broker', 'another broker (it asks the one serving the disks to run the job, and follows it)']) {
  it(`the disks of one VM as one job (local → nas1, san1 → local): ready when both are, complete switches both exports; each target holds its writer's acknowledged writes; started from ${from}`, async () => {
    const other = from === 'this broker' ? undefined : await createBroker(all.config, { plugins: builtinPlugins, logger: silentLogger });
    const asker = other ?? broker;
    const a = await sourceVolume('local');
    const b = await sourceVolume('san1');
    const [ta, tb] = [`nas1/vm-disk0-${++n}`, `local/vm-disk1-${n}`];
    const ea = await broker.exports.start(a.ref, { listen: { port: 0 } });
    const eb = await broker.exports.start(b.ref, { listen: { port: 0 } });
    const wa = await NbdWriter.start({ port: portOf(ea), name: ea.name, connections: 2 }, a.bytes);
    const wb = await NbdWriter.start({ port: portOf(eb), name: eb.name, connections: 2 }, b.bytes);
    const job = await asker.liveCopy([{ source: a.ref, target: ta }, { source: b.ref, target: tb }], { mode: 'write-blocking' });
    await untilStatus(job, 'ready', asker);
    const listed = await broker.exports.list();
    expect(listed.filter((e) => e.liveJob === job.id).map((e) => e.name).sort()).toEqual([ea.name, eb.name].sort());
    await expect(asker.volumes.delete(b.ref)).rejects.toMatchObject({ code: 'Busy', data: { holder: job.id } });
    await asker.jobs.complete(job.id);
    const done = await job.wait();
    await other?.close();
    expect(done.error).toBeUndefined();
    expect(done.authoritative).toEqual({ side: 'target', ref: ta, refs: [ta, tb] });
    await new Promise((r) => setTimeout(r, 100));
    await Promise.all([wa.stop(), wb.stop()]);
    const after = await broker.exports.list();
    expect(after.find((e) => e.name === ea.name)?.ref).toBe(ta);
    expect(after.find((e) => e.name === eb.name)?.ref).toBe(tb);
    await ea.stop();
    await eb.stop();
    expect((await readAll(ta)).equals(wa.model)).toBe(true);
    expect((await readAll(tb)).equals(wb.model)).toBe(true);
    await expect(broker.liveCopy([{ source: ta, target: `local/x-${++n}` }, { source: ta, target: `local/y-${n}` }])).rejects.toMatchObject({ code: 'InvalidArgument' });
  });
  }

  for (const [from, to, path] of [['local', 'san1', 'PUT'], ['san1', 'local', 'GET']] as const) {
    it(`${from} → ${to} while the SAN mock answers its data plane's ${path}s with 503s, resets and a stall: retried, nothing lost`, async () => {
      const src = await sourceVolume(from);
      const dst = `${to}/live-faulty-${++n}`;
      const exp = await broker.exports.start(src.ref, { listen: { port: 0 } });
      const writer = await NbdWriter.start({ port: portOf(exp), name: exp.name, connections: 2 }, src.bytes);
      all.san.faults.add(
        { method: path, path: '/data/volumes/*', nth: [2, 5, 9, 14], action: { type: 'status', status: 503 } },
        { method: path, path: '/data/volumes/*', nth: [3, 11], action: { type: 'reset' } },
        { method: path, path: '/data/volumes/*', nth: [7], action: { type: 'latency', ms: 800 } },
      );
      try {
        const job = await broker.copy(src.ref, dst, { live: true });
        await untilStatus(job, 'ready');
        await broker.jobs.complete(job.id);
        expect((await job.wait()).error).toBeUndefined();
        await new Promise((r) => setTimeout(r, 100));
        await writer.stop();
        expect(all.san.faults.list().map((r) => r.fired)).toEqual([4, 2, 1]); // every fault happened
      } finally {
        all.san.faults.clear();
      }
      await exp.stop();
      expect((await readAll(dst)).equals(writer.model)).toBe(true);
    });
  }

  it.skipIf(!HAVE.qemu)('qemu-io writes through the export across the switch-over; its pattern reads back from the target', async () => {
    const src = await sourceVolume('local');
    const dst = `san1/live-dst-${++n}`;
    const exp = await broker.exports.start(src.ref, { listen: { port: 0 } });
    const job = await broker.copy(src.ref, dst, { live: true });
    // qemu-io writes while the bulk pass runs and after ready, in one connection across the switch-over.
    const before = qemuIo(exp.uri, Array.from({ length: 64 }, (_, i) => `write -P ${(i % 200) + 20} ${(8 * MiB) + i * 64 * 1024} 64k`));
    await untilStatus(job, 'ready');
    await before;
    await broker.jobs.complete(job.id);
    await job.result();
    await qemuIo(exp.uri, ['write -P 9 12M 1M', 'read -P 9 12M 1M', ...Array.from({ length: 64 }, (_, i) => `read -P ${(i % 200) + 20} ${(8 * MiB) + i * 64 * 1024} 64k`)]);
    await exp.stop();
    const data = await readAll(dst);
    expect(data.subarray(12 * MiB, 13 * MiB).every((b) => b === 9)).toBe(true);
    expect(data.subarray(0, 8 * MiB).equals(src.bytes.subarray(0, 8 * MiB))).toBe(true);
    for (let i = 0; i < 64; i++) expect(data[8 * MiB + i * 64 * 1024]).toBe((i % 200) + 20);
  });

  it('during the job: SRC and DST cannot be deleted, resized or copied into (Busy naming the job); `nbd stop` is refused; `--force` cancels it, SRC stays current and the DST it created is deleted', async () => {
    const src = await sourceVolume('local');
    const dst = `local/live-dst-${++n}`;
    const exp = await broker.exports.start(src.ref, { listen: { port: 0 } });
    const writer = await NbdWriter.start({ port: portOf(exp), name: exp.name, connections: 1 }, src.bytes);
    const job = await broker.copy(src.ref, dst, { live: true, speed: 256 * 1024 }); // slow: stays in the bulk pass
    await new Promise((r) => setTimeout(r, 100));
    expect(job.info().status).toBe('running');
    for (const ref of [src.ref, dst]) {
      await expect(broker.volumes.delete(ref)).rejects.toMatchObject({ code: 'Busy', data: { holder: job.id } });
      await expect(broker.volumes.resize(ref, 2 * SIZE)).rejects.toMatchObject({ code: 'Busy', data: { holder: job.id } });
    }
    await expect(broker.copy(src.ref, `san1/live-other-${++n}`, { live: true })).rejects.toMatchObject({ code: 'Busy' });
    await expect(broker.exports.stop(exp.name)).rejects.toMatchObject({ code: 'Busy', data: { holder: job.id } });
    await broker.exports.stop(exp.name, { force: true });
    const info = await job.wait();
    expect(info.error?.code).toBe('Cancelled');
    expect(info.authoritative?.side).toBe('source');
    await expect(writer.stop()).rejects.toThrow(); // its connection was closed by the stop
    expect(await broker.volumes.list('local').then((p) => p.items.some((v) => `local/${v.name}` === dst))).toBe(false);
    // Every write acknowledged before the stop is on the source.
    expect((await readAll(src.ref)).equals(writer.model)).toBe(true);
  });

  it('cancel after ready: the target is a consistent copy of the source as it was, the source stays exported and current', async () => {
    const src = await sourceVolume('san1');
    const dst = `nas1/live-dst-${++n}`;
    const exp = await broker.exports.start(src.ref, { listen: { port: 0 } });
    const writer = await NbdWriter.start({ port: portOf(exp), name: exp.name, connections: 2 }, src.bytes);
    const job = await broker.copy(src.ref, dst, { live: true });
    await untilStatus(job, 'ready');
    await writer.stop(); // a quiet source, so "as it was" is the model
    await broker.jobs.cancel(job.id);
    const info = await job.wait();
    expect(info.error?.code).toBe('Cancelled');
    expect((await broker.exports.list()).find((e) => e.name === exp.name)?.ref).toBe(src.ref);
    expect((await readAll(dst)).equals(writer.model)).toBe(true);
    await exp.stop();
    expect((await readAll(src.ref)).equals(writer.model)).toBe(true);
  });

  // Resumed here naming the point (`copy --live SRC DST --since live-…`), from another broker naming the job (`--resume JOB`), from another broker naming the point.
  for (const [from, to, how] of [['local', 'san1', 'since'], ['san1', 'local', 'resume elsewhere'], ['nas1', 'local', 'since elsewhere']] as const) {
    it(`${from} → ${to}: cancelled after ready, it resumes with only what changed since (the source's snapshot at the cancel), and completes${how === 'since' ? '' : ` (${how === 'resume elsewhere' ? 'resumed' : 'started --since the point'} from another broker)`}`, async () => {
      const src = await sourceVolume(from);
      const dst = `${to}/live-dst-${++n}`;
      const exp = await broker.exports.start(src.ref, { listen: { port: 0 } });
      const writer = await NbdWriter.start({ port: portOf(exp), name: exp.name, connections: 2, span: 2 * MiB }, src.bytes);
      const first = await broker.copy(src.ref, dst, { live: true });
      await untilStatus(first, 'ready');
      await broker.jobs.cancel(first.id);
      const cancelled = await first.wait();
      expect(cancelled.error?.code).toBe('Cancelled');
      const since = cancelled.resumeSince?.[0];
      expect(since).toMatch(/^live-[0-9a-f]+$/);
      expect((await broker.snapshots.list(src.ref)).map((x) => x.name)).toContain(since);
      // The guest goes on writing (within its first 2 MiB); then the copy resumes from the point.
      const ackedAtCancel = writer.acked;
      for (let i = 0; i < 300 && writer.acked < ackedAtCancel + 50; i++) await new Promise((r) => setTimeout(r, 10));
      await writer.stop();
      const changed = (await broker.volumes.changes(src.ref, { since: since! })).extents.reduce((x, e) => x + e.length, 0);
      expect(changed).toBeLessThanOrEqual(2 * MiB + 128 * 1024);
      // One way names the snapshot; another names the job (`copy --live --resume JOB`), whose record
      // has it — from another broker, which asks this one (it serves the source) to resume it, as
      // it asks it to start a copy from the snapshot.
      const other = how === 'since' ? undefined : await createBroker(all.config, { plugins: builtinPlugins, logger: silentLogger });
      const asker = other ?? broker;
      const second = how === 'resume elsewhere' ? await other!.liveCopy([], { resume: first.id }) : await asker.copy(src.ref, dst, { live: true, since: since! });
      expect((second.info().params.pairs as { source: string; target: string; since?: string }[])[0]).toMatchObject({ source: src.ref, target: dst, since });
      await untilStatus(second, 'ready', asker);
      // The first pass moved the changes, not the volume's 8 MiB of data again (a quiet source: nothing else).
      expect((await asker.jobs.get(second.id)).info().progress.current).toBeLessThanOrEqual(changed);
      // A guest writes again while the resumed copy is ready, and across the switch-over.
      const again = await NbdWriter.start({ port: portOf(exp), name: exp.name, connections: 2 }, writer.model);
      for (let i = 0; i < 300 && again.acked < 50; i++) await new Promise((r) => setTimeout(r, 10));
      await asker.jobs.complete(second.id);
      const done = await second.wait();
      await other?.close();
      expect(done.error).toBeUndefined();
      await again.stop();
      expect((await broker.exports.list()).find((e) => e.name === exp.name)?.ref).toBe(dst);
      expect((await readAll(dst)).equals(again.model)).toBe(true);
      // The point it resumed from has served: it is gone.
      expect((await broker.snapshots.list(src.ref)).map((x) => x.name)).not.toContain(since);
      await exp.stop();
    });
  }

  it('resume refused clearly: an unknown job, one that is no live copy, one still running, one that left no point, other pairs', async () => {
    const src = await sourceVolume('local');
    const exp = await broker.exports.start(src.ref, { listen: { port: 0 } });
    await expect(broker.liveCopy([], { resume: 'mirror-nope' })).rejects.toMatchObject({ code: 'NotFound' });
    const snapJob = await broker.copy(src.ref, `local/plain-${++n}`, {}).catch(() => undefined);
    if (snapJob) {
      await snapJob.wait();
      await expect(broker.liveCopy([], { resume: snapJob.id })).rejects.toMatchObject({ code: 'InvalidArgument', message: expect.stringMatching(/not a live copy/) });
    }
    const dst = `local/live-rs-${++n}`;
    const running = await broker.copy(src.ref, dst, { live: true, speed: 64 * 1024 });
    await expect(broker.liveCopy([], { resume: running.id })).rejects.toMatchObject({ code: 'FailedPrecondition', message: expect.stringMatching(/only one that has ended/) });
    await broker.jobs.cancel(running.id); // before ready: no point
    await running.wait();
    await expect(broker.liveCopy([], { resume: running.id })).rejects.toMatchObject({ code: 'FailedPrecondition', message: expect.stringMatching(/left no point/) });
    const ready = await broker.copy(src.ref, dst, { live: true });
    await untilStatus(ready, 'ready');
    await broker.jobs.cancel(ready.id);
    await ready.wait();
    await expect(broker.liveCopy([{ source: src.ref, target: `local/other-${++n}` }], { resume: ready.id })).rejects.toMatchObject({ code: 'InvalidArgument', message: expect.stringMatching(/give no pairs, or the same/) });
    const resumed = await broker.liveCopy([{ source: src.ref, target: dst }], { resume: ready.id });
    await broker.jobs.cancel(resumed.id);
    await resumed.wait();
    await exp.stop();
  });

  it('refused clearly: a source nobody exports here, a read-only export, --verify, a bad mode, a target smaller than the source', async () => {
    const src = await sourceVolume('local');
    await expect(broker.copy(src.ref, `local/x-${++n}`, { live: true })).rejects.toMatchObject({ code: 'FailedPrecondition', message: expect.stringContaining('not exported read-write') });
    const ro = await broker.exports.start(src.ref, { listen: { port: 0 }, readOnly: true });
    await expect(broker.copy(src.ref, `local/x-${++n}`, { live: true })).rejects.toMatchObject({ code: 'FailedPrecondition' });
    await ro.stop();
    const exp = await broker.exports.start(src.ref, { listen: { port: 0 } });
    await expect(broker.copy(src.ref, `local/x-${++n}`, { live: true, verify: true })).rejects.toMatchObject({ code: 'InvalidArgument' });
    await expect(broker.copy(src.ref, `local/x-${++n}`, { live: true, mode: 'sideways' as never })).rejects.toMatchObject({ code: 'InvalidArgument' });
    await expect(broker.copy(src.ref, src.ref, { live: true })).rejects.toMatchObject({ code: 'InvalidArgument' });
    const small = `local/small-${++n}`;
    await broker.volumes.create(small, { sizeBytes: SIZE / 2 });
    await expect(broker.copy(src.ref, small, { live: true })).rejects.toMatchObject({ code: 'OutOfRange' });
    await expect(broker.copy(src.ref, small, { mode: 'background' })).rejects.toMatchObject({ code: 'InvalidArgument' });
    await exp.stop();
  });

  it('a tenant\'s live copy resumed by an administrator (as a service does after its restart) stays the tenant\'s', async () => {
    const alice = broker.as({ id: 'alice', role: 'tenant' });
    const src = await sourceVolume('local', alice);
    const exp = await alice.exports.start(src.ref, { listen: { port: 0 } });
    const dst = `local/alice-rs-${++n}`;
    const first = await alice.copy(src.ref, dst, { live: true });
    await untilStatus(first, 'ready');
    await alice.jobs.cancel(first.id);
    await first.wait();
    const again = await broker.liveCopy([], { resume: first.id });
    expect(again.info().owner).toBe('alice');
    expect((await alice.jobs.get(again.id)).info().id).toBe(again.id); // she sees it, and may end it
    await alice.jobs.cancel(again.id);
    await again.wait();
    await exp.stop();
  });

  it('a tenant cannot block an administrator\'s migration of its volume: its `nbd stop` is refused, forced is PermissionDenied; the switch-over keeps its export', async () => {
    const alice = broker.as({ id: 'alice', role: 'tenant' });
    const ref = `local/alice-${++n}`;
    await alice.volumes.create(ref, { sizeBytes: SIZE });
    const exp = await alice.exports.start(ref, { listen: { port: 0 } });
    const job = await broker.copy(ref, `san1/alice-moved-${n}`, { live: true });
    await untilStatus(job, 'ready');
    await expect(alice.exports.stop(exp.name)).rejects.toMatchObject({ code: 'Busy' });
    await expect(alice.exports.stop(exp.name, { force: true })).rejects.toMatchObject({ code: 'PermissionDenied' });
    await expect(alice.volumes.delete(ref)).rejects.toMatchObject({ code: 'Busy' });
    await broker.jobs.complete(job.id);
    await job.result();
    const mine = await alice.exports.list();
    expect(mine.find((e) => e.name === exp.name)?.ref).toBe(`san1/alice-moved-${n}`);
    expect((await alice.volumes.get(`san1/alice-moved-${n}`)).owner).toBe('alice'); // the target is the tenant's
    await alice.exports.stop(exp.name);
  });
});
