import { closeSync, openSync, ftruncateSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { imageDevice } from '../engine/image-device.js';
import { runMap } from '../cli/map.js';
import type { ImgOutput } from '../cli/output.js';
import { createImage, openImage } from '../index.js';
import { hasQemu, ok, qemuIo, tempDir, warnIfNoQemu } from './helpers.js';
import { dataExtents, seekDataAvailable, setSeekDataEnabled } from '../engine/seek-data.js';

const K = 1024;
const M = 1024 * K;
const native = seekDataAvailable();
if (!native) console.warn('SKIPPED native SEEK_DATA tests: native/fileio is not built (npm run build:native)');
warnIfNoQemu('raw map vs qemu-img map');

/** A sparse file of `size` bytes with `fill` written at each [offset, length]. */
function sparseFile(path: string, size: number, writes: [number, number, number?][]): void {
  const fd = openSync(path, 'w+');
  try {
    ftruncateSync(fd, size);
    for (const [off, len, fill] of writes) writeSync(fd, Buffer.alloc(len, fill ?? 0xa5), 0, len, off);
  } finally {
    closeSync(fd);
  }
}

/** `offload img map` as the CLI prints it (text plus the final newline). */
async function ourMap(file: string, extra: { startOffset?: number; maxLength?: number } = {}): Promise<string> {
  let text = '';
  const out: ImgOutput = { print: (_v, t) => (text += t + '\n'), warn: () => undefined, setExitCode: () => undefined };
  await runMap({ file, format: 'raw', output: 'json', ...extra }, out);
  return text;
}

describe('SEEK_DATA / SEEK_HOLE on raw files', () => {
  const { dir, cleanup } = tempDir('seek-data-');
  afterAll(cleanup);
  afterEach(() => setSeekDataEnabled(true));

  const writes: [number, number][] = [[1 * M, 64 * K], [5 * M + 4 * K, 4 * K], [64 * M - 4 * K, 4 * K]];
  let file: string;
  beforeAll(() => {
    file = join(dir, 'sparse.raw');
    sparseFile(file, 64 * M, writes);
  });

  it.skipIf(!native)('the addon finds the data and hole extents of a sparse file', () => {
    const fd = openSync(file, 'r');
    try {
      const ext = dataExtents(fd, 0, 64 * M)!;
      expect(ext).toBeDefined();
      // Every write is inside an extent, and the file system keeps nothing else (4 KiB blocks).
      for (const [off, len] of writes) expect(ext.some(([a, b]) => a <= off && off + len <= b)).toBe(true);
      expect(ext).toEqual([[1 * M, 1 * M + 64 * K], [5 * M + 4 * K, 5 * M + 8 * K], [64 * M - 4 * K, 64 * M]]);
      // Clipped to the range asked; a range inside a hole has no data.
      expect(dataExtents(fd, 1 * M + 16 * K, 5 * M + 6 * K)).toEqual([[1 * M + 16 * K, 1 * M + 64 * K], [5 * M + 4 * K, 5 * M + 6 * K]]);
      expect(dataExtents(fd, 2 * M, 5 * M)).toEqual([]);
      // Past the end of the file: ENXIO, no data.
      expect(dataExtents(fd, 64 * M, 80 * M)).toEqual([]);
      setSeekDataEnabled(false);
      expect(dataExtents(fd, 0, 64 * M)).toBeUndefined();
    } finally {
      closeSync(fd);
    }
  });

  it.skipIf(!native)('other errors are thrown (a closed descriptor is EBADF)', () => {
    const fd = openSync(file, 'r');
    closeSync(fd);
    expect(() => dataExtents(fd, 0, M)).toThrow(/Bad file descriptor/);
  });

  it.skipIf(!native)('RawImage.blockStatus reports allocated data, written zeros included', async () => {
    const f = join(dir, 'zeros.raw');
    sparseFile(f, 8 * M, [[0, 4 * K, 1], [2 * M, 64 * K, 0]]); // a block of data, then written zeros
    const img = await openImage(f, { format: 'raw' });
    try {
      const st = (await img.blockStatus()).map((s) => [s.start, s.length, s.data, s.zero]);
      expect(st).toEqual([[0, 4 * K, true, false], [4 * K, 2 * M - 4 * K, false, true], [2 * M, 64 * K, true, false], [2 * M + 64 * K, 6 * M - 64 * K, false, true]]);
      // convert copies only the data extents of a raw source.
      const dev = await imageDevice(img, { mode: 'r' });
      expect((await dev.extents()).filter((e) => e.kind === 'data').map((e) => [e.offset, e.length])).toEqual([[0, 4 * K], [2 * M, 64 * K]]);
    } finally {
      await img.close();
    }
  });

  it('the content-scan fallback still finds the data (and calls written zeros holes)', async () => {
    setSeekDataEnabled(false);
    const f = join(dir, 'fallback.raw');
    sparseFile(f, 8 * M, [[0, 4 * K, 1], [2 * M, 64 * K, 0], [3 * M, 8 * K, 7]]);
    const img = await openImage(f, { format: 'raw' });
    try {
      const st = (await img.blockStatus()).map((s) => [s.start, s.length, s.data, s.zero]);
      expect(st).toEqual([[0, 4 * K, true, false], [4 * K, 3 * M - 4 * K, false, true], [3 * M, 8 * K, true, false], [3 * M + 8 * K, 5 * M - 8 * K, false, true]]);
      // Without SEEK_DATA convert reads the raw source straight through.
      expect(await (await imageDevice(img, { mode: 'r' })).extents()).toEqual([{ offset: 0, length: 8 * M, kind: 'data' }]);
    } finally {
      await img.close();
    }
  });

  it.skipIf(!hasQemu)('a raw file that is not whole sectors: size, map and create as qemu-img (rounded up to 512)', async () => {
    const f = join(dir, 'odd.raw');
    writeFileSync(f, Buffer.alloc(1000, 9));
    const theirs = JSON.parse(ok('qemu-img', ['info', '--output=json', '-f', 'raw', f])) as { 'virtual-size': number };
    const img = await openImage(f);
    expect(img.virtualSize).toBe(theirs['virtual-size']);
    expect(Array.from(await img.read(996, 28))).toEqual([9, 9, 9, 9, ...new Array(24).fill(0)]);
    await img.close();
    if (native) expect(await ourMap(f)).toBe(ok('qemu-img', ['map', '--output=json', '-f', 'raw', f]));
    const made = join(dir, 'made-1000.raw');
    await createImage(made, { format: 'raw', size: 1000 });
    ok('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'theirs-1000.raw'), '1000']);
    expect(statSync(made).size).toBe(statSync(join(dir, 'theirs-1000.raw')).size);
  });

  describe.skipIf(!hasQemu)('img map --output=json equals qemu-img map byte for byte', () => {
    const cases: [string, number, string[]][] = [
      ['qemu-made', 16 * M, ['write -P 1 1M 64k', 'write -P 0 4M 64k', 'write -P 2 15M 1M']],
      ['empty', 8 * M, []],
      ['full', 2 * M, ['write -P 3 0 2M']],
      ['scattered', 32 * M, ['write -P 4 4k 4k', 'write -P 5 3M 12k', 'write -P 6 31M 1M']],
    ];
    it.each(cases)('%s', async (name, size, cmds) => {
      const f = join(dir, `${name}.raw`);
      ok('qemu-img', ['create', '-f', 'raw', f, String(size)]);
      if (cmds.length) expect(qemuIo(f, cmds, 'raw').status).toBe(0);
      const theirs = ok('qemu-img', ['map', '--output=json', '-f', 'raw', f]);
      if (native) {
        expect(await ourMap(f)).toBe(theirs);
        const ranged = ok('qemu-img', ['map', '--output=json', '-f', 'raw', '--start-offset', '1M', '--max-length', '3M', f]);
        expect(await ourMap(f, { startOffset: M, maxLength: 3 * M })).toBe(ranged);
      } else {
        // The fallback guesses holes from the content: the same data, written zeros aside.
        const dataOf = (json: string) => (JSON.parse(json) as { data: boolean }[]).some((e) => e.data);
        expect(dataOf(await ourMap(f))).toBe(cmds.some((c) => !c.includes('-P 0')));
      }
    });
  });
});
