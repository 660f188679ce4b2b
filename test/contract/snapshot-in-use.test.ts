/**
 * Snapshots of a disk in use, on every backend: while a guest writes to a volume over NBD (its
 * export read-write in this broker), snapshots are taken and then deleted — a rotation, as a
 * platform's snapshot schedule runs it. Deleting is made within the export's lock as taking is
 * (the pool merges the deleted snapshot's layer into the next one: a frozen layer, or the open
 * image the guest writes to). Every write the export acknowledged is in the volume after; the
 * snapshot kept reads the same before and after the older ones went.
 */
import { describe, expect, it } from 'vitest';
import type { Broker } from '../../core/index.js';
import { allBackendsForFile, withDevice } from '../support/all-backends.js';
import { NbdWriter } from '../support/nbd-writer.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;

describe('snapshots of a volume exported read-write, taken and deleted while a guest writes', () => {
  let broker: Broker;
  allBackendsForFile('offload-snap-in-use-', (all) => { broker = all.broker; });

  const read = (ref: string) => withDevice(broker, ref, 'r', async (d) => Buffer.from(await d.read(0, SIZE)));
  const readSnapshot = async (backend: string, volume: string, snapshot: string) => {
    const d = await broker.backend(backend).openSnapshot!(volume, snapshot);
    try {
      return Buffer.from(await d.read(0, SIZE));
    } finally {
      await d.close();
    }
  };

  for (const backend of ['local', 'san1', 'nas1']) {
    it(`${backend}: three snapshots taken, the two older deleted, then the last; no acknowledged write lost`, async () => {
      const volume = 'rot';
      const ref = `${backend}/${volume}`;
      await broker.volumes.create(ref, { sizeBytes: SIZE });
      const exp = await broker.exports.start(ref, { name: `rot-${backend}`, listen: { port: 0 } });
      const writer = await NbdWriter.start({ port: Number(new URL(exp.uri).port), name: `rot-${backend}`, pauseMs: 1 }, Buffer.alloc(SIZE));
      const writes = async (n: number) => {
        const until = writer.acked + n;
        for (let i = 0; i < 500 && writer.acked < until && !writer.failed; i++) await new Promise((r) => setTimeout(r, 5));
        expect(writer.failed).toBeUndefined();
      };
      try {
        for (const s of ['s1', 's2', 's3']) {
          await writes(30);
          await broker.snapshots.create(`${ref}@${s}`);
        }
        await writes(30);
        const s3 = await readSnapshot(backend, volume, 's3');
        await broker.snapshots.delete(`${ref}@s1`);
        await writes(15);
        await broker.snapshots.delete(`${ref}@s2`);
        await writes(15);
        expect((await broker.snapshots.list(ref)).map((x) => x.name)).toEqual(['s3']);
        expect((await readSnapshot(backend, volume, 's3')).equals(s3)).toBe(true);
        // The last one too: on the pool, its layer is merged into the image the guest is writing.
        await broker.snapshots.delete(`${ref}@s3`);
        await writes(30);
        expect(await broker.snapshots.list(ref)).toEqual([]);
      } finally {
        await writer.stop();
        await exp.stop();
      }
      expect(writer.acked).toBeGreaterThan(150);
      expect((await read(ref)).equals(writer.model)).toBe(true);
    });
  }
});
