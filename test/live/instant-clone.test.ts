/**
 * `clone --instant` through the broker on real backends (pool → SAN mock, SAN mock → NAS mock,
 * NAS mock → pool): the clone is exported at once and written by an NBD writer (a model of every
 * acknowledged write, read-backs on the way) while its fill job runs at a limited speed; reads of
 * ranges not filled yet come from the source; at the end the clone equals the model and the
 * source is free. Also: the source is Busy while the fill runs, and cancel abandons the clone.
 */
import { describe, expect, it } from 'vitest';
import type { Broker, Job, JobStatus } from '../../core/index.js';
import { allBackendsForFile, withDevice, type AllBackends } from '../support/all-backends.js';
import { readExport as readWhole } from '../support/live-service.js';
import { CMD, openExport, readData, reply, request } from '../support/nbd-client.js';
import { NbdWriter, qemuIoWrites } from '../support/nbd-writer.js';
import { HAVE } from '../support/nbd-tools.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

let all: AllBackends;
let broker: Broker;
let n = 0;

allBackendsForFile('offload-instant-', (a) => {
  all = a;
  broker = a.broker;
});

async function sourceVolume(backend: string): Promise<{ ref: string; bytes: Buffer }> {
  const ref = `${backend}/inst-src-${++n}`;
  await broker.volumes.create(ref, { sizeBytes: SIZE });
  const bytes = Buffer.alloc(SIZE);
  await withDevice(broker, ref, 'rw', async (d) => {
    for (let off = 0; off < SIZE; off += 128 * 1024) {
      const chunk = Buffer.alloc(64 * 1024, ((off >> 17) % 200) + 11);
      await d.write(off, chunk);
      chunk.copy(bytes, off);
    }
    await d.flush();
  });
  return { ref, bytes };
}

const readExport = (port: number, name: string) => readWhole(port, name, SIZE);

async function until(job: Job, status: JobStatus): Promise<void> {
  for (let i = 0; i < 3000; i++) {
    if ((await broker.jobs.get(job.id)).info().status === status) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`job ${job.id} never reached ${status}`);
}

describe('instant clone through the broker', () => {
  for (const [from, to] of [['local', 'san1'], ['san1', 'nas1'], ['nas1', 'local']] as const) {
    it(`${from} → ${to}: exported and written at once while it fills; unfilled ranges read from the source; at the end it equals the model and the source is free`, async () => {
      const src = await sourceVolume(from);
      const dst = `${to}/inst-dst-${++n}`;
      const started = await broker.startClone(src.ref, dst, { instant: true, speed: 6 * MiB });
      const job = started.job!;
      expect(job.info().type).toBe('fill');
      const exp = await broker.exports.start(dst, { listen: { port: 0 } });
      const port = Number(new URL(exp.uri).port);
      // Two guests on disjoint ranges: the in-process writer below 12 MiB, qemu-io above it.
      const writer = await NbdWriter.start({ port, name: exp.name, connections: 2, pauseMs: 2, span: 12 * MiB }, src.bytes);
      const qemu = HAVE.qemu ? qemuIoWrites(exp.uri, 12 * MiB, 32) : Promise.resolve([]);
      await new Promise((r) => setTimeout(r, 300));
      // Held mid-fill from here (it needs ~2.7 s at 6 MiB/s), however slowly the machine runs the checks below.
      await broker.jobs.pause(job.id);
      await writer.stop();
      for (const w of await qemu) w.data.copy(writer.model, w.offset);
      expect(writer.acked).toBeGreaterThan(0);
      const mid = (await broker.jobs.get(job.id)).info();
      expect(mid.status).toBe('paused'); // still filling: what was read below came partly from the source
      expect(mid.progress.current).toBeLessThan(mid.progress.total);
      expect((await readExport(port, exp.name)).equals(writer.model)).toBe(true);
      await expect(broker.volumes.delete(src.ref)).rejects.toMatchObject({ code: 'Busy', data: { holder: job.id } });
      const again = await NbdWriter.start({ port, name: exp.name, connections: 2, pauseMs: 2 }, writer.model);
      await broker.jobs.resume(job.id);
      const info = await job.wait();
      expect(info.error).toBeUndefined();
      await new Promise((r) => setTimeout(r, 100)); // writes after the fill ended go on through the same connections
      await again.stop();
      expect((await readExport(port, exp.name)).equals(again.model)).toBe(true);
      await exp.stop();
      await broker.volumes.delete(src.ref); // no longer needed
      expect(await withDevice(broker, dst, 'r', async (d) => Buffer.from(await d.read(0, SIZE)).equals(again.model))).toBe(true);
      await broker.volumes.delete(dst);
    });
  }

  it('the disks of one VM as one fill job (local → san1, san1 → nas1): both usable at once, written while they fill; both equal their models at the end', async () => {
    const a = await sourceVolume('local');
    const b = await sourceVolume('san1');
    const [ta, tb] = [`san1/inst-g0-${++n}`, `nas1/inst-g1-${n}`];
    const job = await broker.instantClone([{ source: a.ref, target: ta }, { source: b.ref, target: tb }], { speed: 8 * MiB });
    expect(job.info().ref).toBe(`${ta},${tb}`);
    const ea = await broker.exports.start(ta, { listen: { port: 0 } });
    const eb = await broker.exports.start(tb, { listen: { port: 0 } });
    const wa = await NbdWriter.start({ port: Number(new URL(ea.uri).port), name: ea.name, connections: 1, pauseMs: 2 }, a.bytes);
    const wb = await NbdWriter.start({ port: Number(new URL(eb.uri).port), name: eb.name, connections: 1, pauseMs: 2 }, b.bytes);
    await new Promise((r) => setTimeout(r, 200));
    expect((await broker.jobs.get(job.id)).info().status).toBe('running');
    await expect(broker.volumes.delete(b.ref)).rejects.toMatchObject({ code: 'Busy', data: { holder: job.id } });
    const info = await job.wait();
    expect(info.error).toBeUndefined();
    await Promise.all([wa.stop(), wb.stop()]);
    expect((await readExport(Number(new URL(ea.uri).port), ea.name)).equals(wa.model)).toBe(true);
    expect((await readExport(Number(new URL(eb.uri).port), eb.name)).equals(wb.model)).toBe(true);
    await ea.stop();
    await eb.stop();
    await expect(broker.instantClone([{ source: a.ref, target: `local/x-${++n}` }, { source: b.ref, target: `local/x-${n}` }])).rejects.toMatchObject({ code: 'InvalidArgument' });
  });

  it('san1 → san1 while the SAN mock answers its data plane with 503s, resets and a stall (reads of the source and writes of the clone): retried, nothing lost', async () => {
    const src = await sourceVolume('san1');
    const dst = `san1/inst-faulty-${++n}`;
    const job = (await broker.startClone(src.ref, dst, { instant: true, speed: 16 * MiB })).job!;
    const exp = await broker.exports.start(dst, { listen: { port: 0 } });
    const port = Number(new URL(exp.uri).port);
    const writer = await NbdWriter.start({ port, name: exp.name, connections: 2, pauseMs: 2 }, src.bytes);
    all.san.faults.add(
      { method: 'GET', path: '/data/volumes/*', nth: [2, 6, 13], action: { type: 'status', status: 503 } },
      { method: 'PUT', path: '/data/volumes/*', nth: [3, 8], action: { type: 'status', status: 503 } },
      { method: 'PUT', path: '/data/volumes/*', nth: [5], action: { type: 'reset' } },
      { method: 'GET', path: '/data/volumes/*', nth: [9], action: { type: 'latency', ms: 800 } },
    );
    try {
      expect((await job.wait()).error).toBeUndefined();
      await writer.stop();
      expect(all.san.faults.list().map((r) => r.fired)).toEqual([3, 2, 1, 1]);
    } finally {
      all.san.faults.clear();
    }
    expect((await readExport(port, exp.name)).equals(writer.model)).toBe(true);
    await exp.stop();
  });

  for (const copyOnRead of [true, false]) {
    it(`${copyOnRead ? 'copy-on-read: a range read once is kept, the second read does not reach the source' : 'without copy-on-read every read of an unfilled range reaches the source'}`, async () => {
      const src = await sourceVolume('san1');
      const dst = `local/inst-cor-${++n}`;
      const job = (await broker.startClone(src.ref, dst, { instant: true, speed: 64 * 1024, ...(copyOnRead ? { copyOnRead: true } : {}) })).job!;
      const exp = await broker.exports.start(dst, { listen: { port: 0 } });
      const c = await openExport(Number(new URL(exp.uri).port), exp.name);
      // Counts the source's reads (never fires).
      all.san.faults.add({ method: 'GET', path: `/data/volumes/${src.ref.slice('san1/'.length)}`, nth: [1_000_000], action: { type: 'status', status: 503 } });
      const readRange = async () => {
        request(c.wire, CMD.READ, 8 * MiB, 4 * MiB);
        const r = await reply(c.wire, 4 * MiB);
        expect(r.error).toBe(0);
        return readData(r, 8 * MiB, 4 * MiB);
      };
      try {
        expect((await readRange()).equals(src.bytes.subarray(8 * MiB, 12 * MiB))).toBe(true);
        const first = all.san.faults.list()[0]!.calls;
        expect(first).toBeGreaterThan(0);
        expect((await readRange()).equals(src.bytes.subarray(8 * MiB, 12 * MiB))).toBe(true);
        const second = all.san.faults.list()[0]!.calls - first;
        if (copyOnRead) expect(second).toBe(0);
        else expect(second).toBeGreaterThan(0);
      } finally {
        all.san.faults.clear();
        request(c.wire, CMD.DISC, 0, 0);
        c.wire.socket.end();
      }
      await broker.jobs.cancel(job.id);
      await job.wait();
      await exp.stopped;
    });
  }

  for (const to of ['local', 'san1'] as const) {
    it(`volumes.open of a clone into ${to} still filling reads through the fill (unfilled ranges from the source); opened "rw" its writes land in the clone; opened "r" it refuses writes`, async () => {
      const src = await sourceVolume('local');
      const dst = `${to}/inst-open-${++n}`;
      const job = (await broker.startClone(src.ref, dst, { instant: true, speed: 1 * MiB })).job!;
      await until(job, 'running');
      const r = await broker.volumes.open(dst, 'r');
      try {
        expect(Buffer.from(await r.read(0, SIZE)).equals(src.bytes)).toBe(true);
        await expect(r.write(0, Buffer.alloc(4096, 1))).rejects.toMatchObject({ code: 'FailedPrecondition' });
        await expect(r.discard!(0, 4096)).rejects.toMatchObject({ code: 'FailedPrecondition' });
      } finally {
        await r.close();
      }
      const model = Buffer.from(src.bytes);
      const w = await broker.volumes.open(dst, 'rw');
      try {
        const data = Buffer.alloc(100_000, 0xa5);
        await w.write(10 * MiB + 777, data);
        data.copy(model, 10 * MiB + 777);
        await w.flush();
        expect(Buffer.from(await w.read(0, SIZE)).equals(model)).toBe(true);
      } finally {
        await w.close();
      }
      const mid = (await broker.jobs.get(job.id)).info();
      expect(mid.status).toBe('running'); // the reads above went partly to the source
      expect(mid.progress.current).toBeLessThan(mid.progress.total);
      await broker.jobs.setSpeed(job.id, 0);
      expect((await job.wait()).error).toBeUndefined();
      expect(await withDevice(broker, dst, 'r', async (d) => Buffer.from(await d.read(0, SIZE)).equals(model))).toBe(true);
      await broker.volumes.delete(dst);
      await broker.volumes.delete(src.ref);
    });
  }

  it('clone() returns the volume at once; cancel abandons the clone: its export stops, it is deleted, a device opened on it answers so', async () => {
    const src = await sourceVolume('local');
    const dst = `local/inst-dst-${++n}`;
    const vol = await broker.clone(src.ref, dst, { instant: true, speed: 1 * MiB });
    expect(vol.sizeBytes).toBe(SIZE);
    const job = (await broker.jobs.list()).find((j) => j.type === 'fill' && j.ref === dst)!;
    const exp = await broker.exports.start(dst, { listen: { port: 0 } });
    await until(await broker.jobs.get(job.id), 'running');
    const opened = await broker.volumes.open(dst, 'r'); // kept across the cancel
    await broker.jobs.cancel(job.id);
    const info = await (await broker.jobs.get(job.id)).wait();
    expect(info.error?.code).toBe('Cancelled');
    await exp.stopped;
    await expect(broker.volumes.get(dst)).rejects.toMatchObject({ code: 'NotFound' });
    // A device opened through the fill answers that the clone is gone, not data of its source.
    await expect(opened.read(0, 4096)).rejects.toMatchObject({ code: 'FailedPrecondition', message: expect.stringMatching(/cancelled/) });
    await opened.close();
    await broker.volumes.delete(src.ref);
  });

  it('refused clearly: an existing target, --linked, --verify', async () => {
    const src = await sourceVolume('local');
    await expect(broker.startClone(src.ref, src.ref, { instant: true })).rejects.toMatchObject({ code: 'AlreadyExists' });
    await expect(broker.startClone(src.ref, `local/x-${++n}`, { instant: true, mode: 'linked' })).rejects.toMatchObject({ code: 'InvalidArgument' });
    await expect(broker.startClone(src.ref, `local/x-${++n}`, { instant: true, verify: true })).rejects.toMatchObject({ code: 'InvalidArgument' });
  });
});
