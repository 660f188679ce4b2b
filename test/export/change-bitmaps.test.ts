/**
 * Read-only exports offer `qemu:dirty-bitmap:S1` for each earlier snapshot S1 of the exported
 * volume on every backend with data.dirty (the pool, the SAN and NAS mocks): nbdinfo and
 * qemu-img map (x-dirty-bitmap) see exactly the backend's changed extents since S1, up to the
 * exported point — QEMU's incremental backup flow, on any backend.
 */
import { describe, expect, it } from 'vitest';
import type { Broker } from '../../core/index.js';
import { allBackendsForFile, withDevice } from '../support/all-backends.js';
import { HAVE, ok } from '../support/nbd-tools.js';

const MiB = 1024 * 1024;

describe.skipIf(!HAVE.libnbd || !HAVE.qemu)('change bitmaps over NBD', () => {
  let broker: Broker;
  allBackendsForFile('offload-change-bitmaps-', (all) => { broker = all.broker; });

  for (const be of ['local', 'san1', 'nas1']) {
    it(`${be}: an export of vol@s2 offers s1 (the changes s1→s2) and an export of the volume offers s1 and s2`, async () => {
      const vol = `${be}/cb`;
      await broker.volumes.create(vol, { sizeBytes: 8 * MiB });
      await withDevice(broker, vol, 'rw', async (d) => { await d.write(0, new Uint8Array(MiB).fill(1)); await d.flush(); });
      await broker.snapshots.create(`${vol}@s1`);
      await withDevice(broker, vol, 'rw', async (d) => { await d.write(2 * MiB, new Uint8Array(128 * 1024).fill(2)); await d.flush(); });
      await broker.snapshots.create(`${vol}@s2`);
      await withDevice(broker, vol, 'rw', async (d) => { await d.write(6 * MiB, new Uint8Array(64 * 1024).fill(3)); await d.flush(); });
      const want = (await broker.volumes.changes(`${vol}@s2`, { since: 's1' })).extents.map((e) => [e.offset, e.length]);
      expect(want).toEqual([[2 * MiB, 128 * 1024]]);

      const snapExport = await broker.exports.start(`${vol}@s2`, { name: `cb-${be}-s2`, listen: { port: 0 } });
      try {
        const list = JSON.parse(await ok('nbdinfo', ['--json', '--content', snapExport.uri])) as { exports: { contexts: string[] }[] };
        expect(list.exports[0]!.contexts).toContain('qemu:dirty-bitmap:s1');
        expect(list.exports[0]!.contexts).not.toContain('qemu:dirty-bitmap:s2');
        const map = JSON.parse(await ok('nbdinfo', ['--json', '--map=qemu:dirty-bitmap:s1', snapExport.uri])) as { offset: number; length: number; type: number }[];
        expect(map.filter((e) => e.type & 1).map((e) => [e.offset, e.length])).toEqual(want);
        const u = new URL(snapExport.uri);
        const q = JSON.parse(await ok('qemu-img', ['map', '--output=json', '--image-opts',
          `driver=nbd,server.type=inet,server.host=${u.hostname},server.port=${u.port},export=${decodeURIComponent(u.pathname.slice(1))},x-dirty-bitmap=qemu:dirty-bitmap:s1`])) as { start: number; length: number; data: boolean }[];
        // x-dirty-bitmap: QEMU shows a dirty range as "data": false.
        expect(q.filter((e) => !e.data).map((e) => [e.start, e.length])).toEqual(want);
      } finally {
        await snapExport.stop();
      }
      const volExport = await broker.exports.start(vol, { name: `cb-${be}`, readOnly: true, listen: { port: 0 } });
      try {
        const map = JSON.parse(await ok('nbdinfo', ['--json', '--map=qemu:dirty-bitmap:s2', volExport.uri])) as { offset: number; length: number; type: number }[];
        expect(map.filter((e) => e.type & 1).map((e) => [e.offset, e.length])).toEqual((await broker.volumes.changes(vol, { since: 's2' })).extents.map((e) => [e.offset, e.length]));
        expect(map.some((e) => e.type & 1 && e.offset === 6 * MiB)).toBe(true);
      } finally {
        await volExport.stop();
      }
    });
  }

  it('a pool volume whose image carries persistent bitmaps (qemu-img bitmap --add) offers them on a read-write export, marked by the writes it serves', async () => {
    const vol = 'local/pbm';
    await broker.volumes.create(vol, { sizeBytes: 8 * MiB });
    const file = (broker.backend('local') as unknown as { chainFiles(v: string): string[] }).chainFiles('pbm')[0]!;
    await ok('qemu-img', ['bitmap', '--add', file, 'b0']);
    await ok('qemu-img', ['bitmap', '--add', '--disable', file, 'frozen']);
    const exp = await broker.exports.start(vol, { name: 'pbm', listen: { port: 0 } });
    try {
      await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 5 1M 4k', '-c', 'write -P 6 5M 100k', exp.uri]);
      const list = JSON.parse(await ok('nbdinfo', ['--json', '--content', exp.uri])) as { exports: { contexts: string[] }[] };
      expect(list.exports[0]!.contexts).toEqual(expect.arrayContaining(['qemu:dirty-bitmap:b0', 'qemu:dirty-bitmap:frozen']));
      const dirty = async (name: string) => (JSON.parse(await ok('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${name}`, exp.uri])) as { offset: number; length: number; type: number }[])
        .filter((e) => e.type & 1).map((e) => [e.offset, e.length]);
      expect(await dirty('b0')).toEqual([[MiB, 64 * 1024], [5 * MiB, 128 * 1024]]);
      expect(await dirty('frozen')).toEqual([]);
    } finally {
      await exp.stop();
    }
    // Stored at close: qemu-img sees the same bits, the image checks clean.
    const info = JSON.parse(await ok('qemu-img', ['info', '--output=json', file])) as { 'format-specific': { data: { bitmaps: { name: string; flags: string[] }[] } } };
    expect(info['format-specific'].data.bitmaps.map((b) => [b.name, b.flags])).toEqual([['b0', ['auto']], ['frozen', []]]);
    await ok('qemu-img', ['check', file]);
  });
});
