/**
 * A point of a disk in use, read while the disk is written, on every backend: a VM's volume is
 * exported read-write in this broker and a guest writes to it over NBD; a snapshot of it is then
 * cloned on its backend, cloned through the host and instantly to another, copied into an
 * existing volume and exported to a file — a new VM made from a running VM's snapshot (CSI's
 * volume from a snapshot, Cinder's volume from a snapshot of an attached volume), a backup copy.
 * Each result holds the snapshot's data; every write the export acknowledged is in the volume.
 * The volume's other keepers stay while a point is read: it cannot be deleted or reverted. The
 * other way round too: the VM restarted (its export started again) while a copy of its point
 * runs, and another broker sharing the state cloning the point of a disk this one serves.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createBroker, silentLogger, type Broker, type ExportHandle } from '../../core/index.js';
import { builtinPlugins } from '../../plugins/index.js';
import { allBackendsForFile, withDevice, type AllBackends } from '../support/all-backends.js';
import { NbdWriter } from '../support/nbd-writer.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
const files = mkdtempSync(join(tmpdir(), 'offload-clone-in-use-'));
afterAll(() => rmSync(files, { recursive: true, force: true }));

describe('a snapshot of a volume exported read-write, cloned and copied while a guest writes', () => {
  let all: AllBackends;
  let broker: Broker;
  allBackendsForFile('offload-clone-in-use-', (a) => { all = a; broker = a.broker; });

  const read = async (b: Broker, ref: string) => {
    const [volume, snapshot] = ref.split('@') as [string, string | undefined];
    if (snapshot === undefined) return withDevice(b, ref, 'r', async (d) => Buffer.from(await d.read(0, SIZE)));
    const [backend, name] = volume.split('/') as [string, string];
    const d = await b.backend(backend).openSnapshot!(name, snapshot);
    try {
      return Buffer.from(await d.read(0, SIZE));
    } finally {
      await d.close();
    }
  };
  const portOf = (e: ExportHandle) => Number(new URL(e.uri).port);

  /** A volume exported read-write with a guest writing to it, and a snapshot `p` of it taken meanwhile (its data read back). */
  async function diskInUse(ref: string) {
    await broker.volumes.create(ref, { sizeBytes: SIZE });
    const name = ref.replace('/', '-');
    const exp = await broker.exports.start(ref, { name, listen: { port: 0 } });
    const writer = await NbdWriter.start({ port: portOf(exp), name, pauseMs: 1 }, Buffer.alloc(SIZE));
    const writes = async (n: number) => {
      const until = writer.acked + n;
      for (let i = 0; i < 2000 && writer.acked < until && !writer.failed; i++) await new Promise((r) => setTimeout(r, 5));
      expect(writer.failed).toBeUndefined();
      expect(writer.acked).toBeGreaterThanOrEqual(until);
    };
    await writes(30);
    await broker.snapshots.create(`${ref}@p`);
    await writes(10);
    const point = await read(broker, `${ref}@p`);
    return { exp, writer, writes, point, name };
  }

  for (const [backend, other] of [['local', 'san1'], ['san1', 'nas1'], ['nas1', 'local']] as const) {
    it(`${backend}: cloned on ${backend}, through the host and instantly to ${other}, copied into a volume of ${other}, exported to a file; all hold the point, none lost a write; the volume is kept meanwhile`, async () => {
      const ref = `${backend}/vm`;
      const { exp, writer, writes, point } = await diskInUse(ref);
      try {
        const native = await broker.clone(`${ref}@p`, `${backend}/from-p`);
        expect(native.name).toBe('from-p');
        // A slow one first: while it reads the point, the volume's keepers are refused.
        const host = await broker.startClone(`${ref}@p`, `${other}/host-p`, { mode: 'full', prefer: 'host', speed: 64 * 1024 });
        await expect(broker.volumes.delete(ref)).rejects.toMatchObject({ code: 'Busy', data: { holder: host.job!.id } });
        await expect(broker.snapshots.revert(`${ref}@p`)).rejects.toMatchObject({ code: 'Busy' });
        await expect(broker.snapshots.delete(`${ref}@p`)).rejects.toMatchObject({ code: 'Busy' });
        await broker.jobs.setSpeed(host.job!.id, 0);
        await broker.volumes.create(`${other}/copy-p`, { sizeBytes: SIZE });
        const copy = await broker.copy(`${ref}@p`, `${other}/copy-p`);
        const instant = await broker.instantClone([{ source: `${ref}@p`, target: `${other}/instant-p` }]);
        const file = join(files, `${backend}.raw`);
        const toFile = await broker.volumes.exportTo(`${ref}@p`, file);
        await writes(20);
        for (const job of [host.job!, copy, instant, toFile]) expect((await job.wait()).error).toBeUndefined();
        await writes(20);
        for (const r of [`${backend}/from-p`, `${other}/host-p`, `${other}/copy-p`, `${other}/instant-p`]) expect((await read(broker, r)).equals(point), r).toBe(true);
        expect(readFileSync(file).equals(point)).toBe(true);
      } finally {
        await writer.stop();
        await exp.stop();
      }
      expect(writer.acked).toBeGreaterThan(60);
      expect((await read(broker, ref)).equals(writer.model)).toBe(true);
      expect((await read(broker, `${ref}@p`)).equals(point)).toBe(true);
    });
  }

  it('the VM restarted while its point is copied: the export starts again and is written, a live copy of the disk starts; the copy holds the point', async () => {
    const ref = 'local/restart';
    const { exp, writer, point, name } = await diskInUse(ref);
    await writer.stop();
    await exp.stop();
    await broker.volumes.create('san1/restart-copy', { sizeBytes: SIZE });
    const copy = await broker.copy(`${ref}@p`, 'san1/restart-copy', { speed: 64 * 1024 });
    const again = await broker.exports.start(ref, { name, listen: { port: 0 } });
    const writer2 = await NbdWriter.start({ port: portOf(again), name, pauseMs: 1 }, writer.model);
    for (let i = 0; i < 500 && writer2.acked < 30; i++) await new Promise((r) => setTimeout(r, 5));
    expect(copy.info().status).toBe('running'); // its data at 64 KiB/s: still reading the point
    // And migrated meanwhile: a live copy of the disk works alongside the copy of its point too.
    const live = await broker.copy(ref, 'nas1/restart-moved', { live: true });
    for (let i = 0; i < 500 && live.info().status !== 'ready'; i++) await new Promise((r) => setTimeout(r, 10));
    expect(live.info().status).toBe('ready');
    expect(copy.info().status).toBe('running');
    await broker.jobs.cancel(live.id);
    await live.wait();
    await broker.jobs.setSpeed(copy.id, 0);
    expect((await copy.wait()).error).toBeUndefined();
    await writer2.stop();
    await again.stop();
    expect(writer2.acked).toBeGreaterThan(0);
    expect((await read(broker, 'san1/restart-copy')).equals(point)).toBe(true);
    expect((await read(broker, ref)).equals(writer2.model)).toBe(true);
  });

  it('from another broker on the same state (another process, as far as locks go): the point of a disk this one serves is cloned and copied there; a copy stopped with it is resumed by the next', async () => {
    const ref = 'local/shared';
    const { exp, writer, writes, point } = await diskInUse(ref);
    const other = await createBroker(all.config, { plugins: builtinPlugins, logger: silentLogger });
    try {
      await other.clone(`${ref}@p`, 'local/shared-clone');
      const host = await other.startClone(`${ref}@p`, 'nas1/shared-clone', { mode: 'full', prefer: 'host' });
      expect((await host.job!.wait()).error).toBeUndefined();
      await expect(other.volumes.delete(ref)).rejects.toMatchObject({ code: 'Busy' }); // the export still keeps it
      await writes(20);
      for (const r of ['local/shared-clone', 'nas1/shared-clone']) expect((await read(other, r)).equals(point), r).toBe(true);
      // A copy of the point that broker runs, stopped with it part-way: the next broker resumes
      // it, within the export that still serves the disk here, and finishes it from its checkpoint.
      await other.volumes.create('san1/shared-copy', { sizeBytes: SIZE });
      const copy = await other.copy(`${ref}@p`, 'san1/shared-copy', { speed: 256 * 1024 });
      for (let i = 0; i < 300 && copy.info().progress.current < 256 * 1024; i++) await new Promise((r) => setTimeout(r, 10));
      expect(copy.info().status).toBe('running');
      await other.close();
      const next = await createBroker(all.config, { plugins: builtinPlugins, logger: silentLogger });
      try {
        const resumed = (await next.jobs.get(copy.id)).info();
        expect(resumed.status).not.toBe('concluded');
        expect(resumed.progress.current).toBeGreaterThan(0); // from its checkpoint, not from zero
        await next.jobs.setSpeed(copy.id, 0);
        const done = await next.jobs.wait(copy.id);
        expect(done.error).toBeUndefined();
        expect(done.status).toBe('concluded');
        expect((await read(next, 'san1/shared-copy')).equals(point)).toBe(true);
      } finally {
        await next.close();
      }
      await writes(20);
    } finally {
      await other.close();
      await writer.stop();
      await exp.stop();
    }
    expect((await read(broker, ref)).equals(writer.model)).toBe(true);
  });
  it('migrated from a snapshot the caller named (copy --live --since S) while a clone reads S: the clone goes on, S stays the caller\'s, the target holds every acknowledged write', async () => {
    const ref = 'san1/keep';
    const { exp, writer, point } = await diskInUse(ref);
    try {
      await broker.volumes.create('nas1/keep-t', { sizeBytes: SIZE });
      expect((await (await broker.copy(`${ref}@p`, 'nas1/keep-t')).wait()).error).toBeUndefined();
      const clone = await broker.startClone(`${ref}@p`, 'local/keep-c', { mode: 'full', prefer: 'host', speed: 16 * 1024 });
      const live = await broker.copy(ref, 'nas1/keep-t', { live: true, since: 'p' });
      for (let i = 0; i < 500 && live.info().status !== 'ready'; i++) await new Promise((r) => setTimeout(r, 10));
      expect(clone.job!.info().status).toBe('running');
      await broker.jobs.complete(live.id);
      expect((await live.wait()).error).toBeUndefined();
      expect((await broker.snapshots.list(ref)).map((x) => x.name)).toContain('p');
      await broker.jobs.setSpeed(clone.job!.id, 0);
      expect((await clone.job!.wait()).error).toBeUndefined();
      expect((await read(broker, 'local/keep-c')).equals(point)).toBe(true);
    } finally {
      await writer.stop();
      await exp.stop();
    }
    expect((await read(broker, 'nas1/keep-t')).equals(writer.model)).toBe(true);
  });

  it('what must still wait: a live copy and a copy of the point into one target; an incremental copy of the volume itself (it reads the moving disk); a point a live copy made itself', async () => {
    const ref = 'local/apart';
    const { exp, writer, name } = await diskInUse(ref);
    try {
      await broker.volumes.create('san1/apart-t', { sizeBytes: SIZE });
      // A copy of the point into T, then a live copy of the disk into T: two writers of T.
      const copy = await broker.copy(`${ref}@p`, 'san1/apart-t', { speed: 16 * 1024 });
      await expect(broker.copy(ref, 'san1/apart-t', { live: true })).rejects.toMatchObject({ code: 'Busy', data: { holder: copy.id } });
      await broker.jobs.cancel(copy.id);
      await copy.wait();
      // The other way round.
      const live = await broker.copy(ref, 'san1/apart-t', { live: true });
      await expect(broker.copy(`${ref}@p`, 'san1/apart-t')).rejects.toMatchObject({ code: 'Busy', data: { holder: live.id } });
      for (let i = 0; i < 500 && live.info().status !== 'ready'; i++) await new Promise((r) => setTimeout(r, 10));
      await broker.jobs.cancel(live.id);
      const cancelled = await live.wait();
      // The point that copy made at its cancel (to resume from): not read alongside the disk's
      // users — a live copy drops such points itself, under no lock of their readers.
      const point = cancelled.resumeSince?.[0];
      expect(point).toMatch(/^live-/);
      await broker.volumes.create('san1/apart-u', { sizeBytes: SIZE });
      await expect(broker.copy(`${ref}@${point!}`, 'san1/apart-u')).rejects.toMatchObject({ code: 'Busy' });
    } finally {
      await writer.stop();
      await exp.stop();
    }
    // An incremental copy of the volume itself reads its moving data: its export waits for it.
    await broker.volumes.create('san1/apart-v', { sizeBytes: SIZE });
    await broker.copy(`${ref}@p`, 'san1/apart-v').then((j) => j.wait());
    const incremental = await broker.copy(ref, 'san1/apart-v', { since: 'p', speed: 1024 });
    await expect(broker.exports.start(ref, { name, listen: { port: 0 } })).rejects.toMatchObject({ code: 'Busy', data: { holder: incremental.id } });
    await broker.jobs.cancel(incremental.id);
    await incremental.wait();
  });
});
