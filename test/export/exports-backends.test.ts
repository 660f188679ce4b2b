/**
 * `broker.exports` on every backend with a data path — the qcow2 pool (qcow2 and raw volumes),
 * the FlashArray and ONTAP mocks (through their data planes), the memory test backend — used by
 * real clients: qemu-img info/map/convert/compare, qemu-io, nbdinfo --map, nbdcopy both ways, a
 * qcow2 overlay over the export. What each client did is checked through the broker's own data
 * path afterwards.
 */
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Broker, Extent } from '../../core/index.js';
import { patternBytes, startAllBackends, withDevice, type AllBackends } from '../support/all-backends.js';
import { memoryModule } from '../support/memory-backend.js';
import { HAVE, ok, qemuIo, qemuMap, tool } from '../support/nbd-tools.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const BACKENDS = ['local', 'localraw', 'san1', 'nas1', 'mem'] as const;

const bytes = (seed: number, offset: number, length: number): Buffer => Buffer.from(patternBytes(seed, offset, length));

/** [offset, length, 'data' | 'zero'] written before the export starts; the rest stays a hole. */
const LAYOUT: readonly [number, number, 'data' | 'zero'][] = [
  [0, 128 * 1024, 'data'],
  [MiB + 512, 70 * 1024, 'data'],
  [3 * MiB, 512 * 1024, 'zero'],
  [3 * MiB + 512 * 1024, 64 * 1024, 'data'],
  [SIZE - 64 * 1024, 64 * 1024, 'data'],
];

function digest(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

/** Data ranges as one list of [offset, length], neighbours merged (clients and backends split them differently). */
function dataRanges(list: { offset: number; length: number; data: boolean }[]): [number, number][] {
  const out: [number, number][] = [];
  for (const e of list) {
    if (!e.data || e.length === 0) continue;
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === e.offset) last[1] += e.length;
    else out.push([e.offset, e.length]);
  }
  return out;
}

describe.skipIf(!HAVE.qemu || !HAVE.libnbd)('exports of every backend, used by real NBD clients', () => {
  let all: AllBackends;
  let broker: Broker;
  let state: string;

  beforeAll(async () => {
    all = await startAllBackends({ extra: (state) => {
      mkdirSync(join(state, 'rawpool'));
      return [{ name: 'localraw', kind: 'qcow2', path: join(state, 'rawpool'), format: 'raw' }, { name: 'mem', kind: 'memory' }];
    }, plugins: [memoryModule], prefix: 'offload-exports-' });
    broker = all.broker;
    state = all.state;
  });

  afterAll(async () => {
    await all?.close();
  });

  describe.each(BACKENDS)('%s', (be) => {
    const ref = `${be}/disk`;
    const dir = () => join(state, `work-${be}`);
    let uri: string;
    let stop: () => Promise<void>;

    beforeAll(async () => {
      mkdirSync(dir(), { recursive: true });
      await broker.volumes.create(ref, { sizeBytes: SIZE });
      await withDevice(broker, ref, 'rw', async (d) => {
        for (const [offset, length, kind] of LAYOUT) {
          if (kind === 'data') await d.write(offset, bytes(1, offset, length));
          else if (d.writeZeroes) await d.writeZeroes(offset, length);
          else await d.write(offset, new Uint8Array(length));
        }
        await d.flush();
      });
      const exp = await broker.exports.start(ref, { listen: { port: 0 } });
      uri = exp.uri;
      stop = exp.stop;
      expect(exp).toMatchObject({ name: ref, ref, readOnly: false });
      expect(uri).toMatch(new RegExp(`^nbd://127\\.0\\.0\\.1:\\d+/${be}/disk$`));
    });

    afterAll(async () => {
      await stop?.();
    });

    it('qemu-img info and nbdinfo see the volume: its size, writable, flush and FUA', async () => {
      const info = JSON.parse(await ok('qemu-img', ['info', '--output=json', uri])) as { 'virtual-size': number };
      expect(info['virtual-size']).toBe(SIZE);
      const n = JSON.parse(await ok('nbdinfo', ['--json', uri])) as { exports: { 'export-size': number; is_read_only: boolean; can_flush: boolean; can_fua: boolean }[] };
      expect(n.exports[0]).toMatchObject({ 'export-size': SIZE, is_read_only: false, can_flush: true, can_fua: true });
    });

    it('nbdinfo --map and qemu-img map report the volume\'s own data extents', async () => {
      const own = await withDevice(broker, ref, 'r', (d) => d.extents(0, SIZE));
      const want = dataRanges(own.map((e: Extent) => ({ offset: e.offset, length: e.length, data: e.kind === 'data' })));
      const map = JSON.parse(await ok('nbdinfo', ['--map', '--json', uri])) as { offset: number; length: number; type: number }[];
      expect(dataRanges(map.map((m) => ({ offset: m.offset, length: m.length, data: (m.type & 1) === 0 })))).toEqual(want);
      const qmap = await qemuMap(uri);
      expect(dataRanges(qmap.map((m) => ({ offset: m.start, length: m.length, data: m.data })))).toEqual(want);
      // Every written range is inside the data the map reports.
      for (const [offset, length, kind] of LAYOUT) {
        if (kind !== 'data') continue;
        expect(want.some(([o, l]) => o <= offset && offset + length <= o + l)).toBe(true);
      }
    });

    it('qemu-img convert reads every byte; qemu-img compare finds the copy identical', async () => {
      const out = join(dir(), 'dump.raw');
      await ok('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out]);
      const own = await withDevice(broker, ref, 'r', (d) => d.read(0, SIZE));
      expect(digest(readFileSync(out))).toBe(digest(own));
      expect((await tool('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, out])).status).toBe(0);
    });

    it('qemu-io writes with patterns, FUA, zeroes and discard; the volume holds them', async () => {
      await qemuIo(uri, ['write -P 0x5a 4M 256k', 'write -f -P 0x6b 5M 4k', 'write -z 4M 64k', 'discard 8M 1M', 'flush',
        'read -P 0 4M 64k', 'read -P 0x5a 4160k 192k', 'read -P 0x6b 5M 4k']);
      await withDevice(broker, ref, 'r', async (d) => {
        expect(Buffer.from(await d.read(4 * MiB, 64 * 1024)).equals(Buffer.alloc(64 * 1024))).toBe(true);
        expect(Buffer.from(await d.read(4 * MiB + 64 * 1024, 192 * 1024)).equals(Buffer.alloc(192 * 1024, 0x5a))).toBe(true);
        expect(Buffer.from(await d.read(5 * MiB, 4096)).equals(Buffer.alloc(4096, 0x6b))).toBe(true);
      });
    });

    it('nbdcopy copies a file into the export and the export into a file and to null:', async () => {
      const src = join(dir(), 'src.raw');
      const content = Buffer.alloc(SIZE);
      bytes(7, 0, 2 * MiB).copy(content, 10 * MiB);
      bytes(8, 0, 4096).copy(content, SIZE - 4096);
      writeFileSync(src, content);
      await ok('nbdcopy', [src, uri]);
      expect(digest(await withDevice(broker, ref, 'r', (d) => d.read(0, SIZE)))).toBe(digest(content));
      const back = join(dir(), 'back.raw');
      await ok('nbdcopy', [uri, back]);
      expect(digest(readFileSync(back))).toBe(digest(content));
      await ok('nbdcopy', [uri, 'null:']);
    });

    it('a qcow2 overlay whose backing file is the export reads through it', async () => {
      const overlay = join(dir(), 'overlay.qcow2');
      await ok('qemu-img', ['create', '-f', 'qcow2', '-b', uri, '-F', 'raw', overlay]);
      await ok('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x99 0 64k', overlay]);
      const merged = join(dir(), 'merged.raw');
      await ok('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', overlay, merged]);
      const want = Buffer.from(await withDevice(broker, ref, 'r', (d) => d.read(0, SIZE)));
      want.fill(0x99, 0, 64 * 1024);
      expect(digest(readFileSync(merged))).toBe(digest(want));
    });

    it('while exported, delete and resize are Busy naming the export; after stop they work', async () => {
      for (const op of [() => broker.volumes.delete(ref), () => broker.volumes.resize(ref, SIZE * 2)]) {
        const e = await op().then(() => undefined, (x: unknown) => x);
        expect(e).toMatchObject({ code: 'Busy' });
        expect(String((e as Error).message)).toMatch(new RegExp(`export ${be}/disk`));
      }
      expect((await broker.exports.list()).map((x) => x.name)).toContain(ref);
      await stop();
      expect((await broker.exports.list()).map((x) => x.name)).not.toContain(ref);
      expect((await tool('qemu-img', ['info', uri])).status).not.toBe(0); // nobody serves it now
      await broker.volumes.resize(ref, SIZE * 2);
      await broker.volumes.delete(ref);
    });
  });
});
