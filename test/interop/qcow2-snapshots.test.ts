/** Internal snapshots both ways: ours listed/applied by qemu-img, qemu's listed/applied/deleted by us. */
import { copyFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openImage, type Image } from '../../plugins/qcow2/index.js';
import { hasQemu, ok, qemuCheckJson, qemuIo, tempDir, warnIfNoQemu } from '../../plugins/qcow2/test/helpers.js';

async function readAll(img: Image): Promise<Buffer> {
  return Buffer.from(await img.read(0, img.virtualSize));
}

function qemuRaw(file: string, dir: string, snapshot?: string): Buffer {
  const out = join(dir, `raw-${Math.random().toString(36).slice(2)}.raw`);
  ok('qemu-img', ['convert', ...(snapshot ? ['-l', snapshot] : []), '-O', 'raw', file, out]);
  return readFileSync(out);
}

function expectClean(file: string): void {
  const { status, json } = qemuCheckJson(file);
  expect({ status, corruptions: json.corruptions ?? 0, leaks: json.leaks ?? 0 }).toEqual({ status: 0, corruptions: 0, leaks: 0 });
}

describe.skipIf(!hasQemu)('qcow2 internal snapshots interop', () => {
  warnIfNoQemu('qcow2 snapshots interop');
  const t = tempDir('qcow2-snap-');
  afterAll(t.cleanup);

  it('snapshots we make are listed and applied by qemu-img', async () => {
    const file = join(t.dir, 'ours.qcow2');
    await createImage(file, { size: 4 << 20 });
    const img = await openImage(file, { readOnly: false });
    await img.write(0, new Uint8Array(300000).fill(1));
    const a = await img.snapshots.create('a');
    expect(a.id).toBe('1');
    const atA = await readAll(img);
    await img.write(100000, new Uint8Array(70000).fill(2));
    await img.writeZeroes(0, 65536);
    await img.snapshots.create('b');
    const atB = await readAll(img);
    await img.write(200000, new Uint8Array(1 << 20).fill(3));
    await img.discard(131072, 65536);
    const now = await readAll(img);
    expect((await img.check()).corruptions).toBe(0);
    await img.close();
    expectClean(file);
    const list = ok('qemu-img', ['snapshot', '-l', file]);
    expect(list).toMatch(/1\s+a\s/);
    expect(list).toMatch(/2\s+b\s/);
    expect(qemuRaw(file, t.dir).equals(now)).toBe(true);
    expect(qemuRaw(file, t.dir, 'a').equals(atA)).toBe(true);
    expect(qemuRaw(file, t.dir, 'b').equals(atB)).toBe(true);
    const copy = join(t.dir, 'ours-applied.qcow2');
    copyFileSync(file, copy);
    ok('qemu-img', ['snapshot', '-a', 'a', copy]);
    expect(qemuRaw(copy, t.dir).equals(atA)).toBe(true);
    expectClean(copy);

    // Apply and delete by us; qemu-img still agrees.
    const again = await openImage(file, { readOnly: false });
    await again.snapshots.apply('b');
    expect((await readAll(again)).equals(atB)).toBe(true);
    await again.snapshots.delete('a');
    expect((await again.snapshots.list()).map((s) => s.name)).toEqual(['b']);
    await again.write(0, new Uint8Array(65536).fill(7));
    await again.snapshots.delete('b');
    const final = await readAll(again);
    await again.close();
    expectClean(file);
    expect(qemuRaw(file, t.dir).equals(final)).toBe(true);
    expect(ok('qemu-img', ['snapshot', '-l', file]).trim()).toBe('');
  });

  it("qemu-img's snapshots are listed, applied and deleted by us", async () => {
    const file = join(t.dir, 'theirs.qcow2');
    ok('qemu-img', ['create', '-f', 'qcow2', file, '4M']);
    expect(qemuIo(file, ['write -P 1 0 1M']).status).toBe(0);
    ok('qemu-img', ['snapshot', '-c', 's1', file]);
    expect(qemuIo(file, ['write -P 2 512k 1M', 'write -z 0 64k']).status).toBe(0);
    ok('qemu-img', ['snapshot', '-c', 's2', file]);
    expect(qemuIo(file, ['write -P 3 3M 64k']).status).toBe(0);
    const s1 = qemuRaw(file, t.dir, 's1');
    const now = qemuRaw(file, t.dir);

    const img = await openImage(file, { readOnly: false });
    const list = await img.snapshots.list();
    expect(list.map((s) => [s.id, s.name, s.diskSize])).toEqual([['1', 's1', 4 << 20], ['2', 's2', 4 << 20]]);
    expect((await readAll(img)).equals(now)).toBe(true);
    await img.snapshots.apply('s1');
    expect((await readAll(img)).equals(s1)).toBe(true);
    await img.snapshots.delete('2');
    await img.write(65536, new Uint8Array(1000).fill(9));
    const final = await readAll(img);
    await img.close();
    expectClean(file);
    expect(qemuRaw(file, t.dir).equals(final)).toBe(true);
    expect(ok('qemu-img', ['snapshot', '-l', file])).toMatch(/1\s+s1/);
  });

  it('a v2 image keeps snapshots right too', async () => {
    const file = join(t.dir, 'v2.qcow2');
    await createImage(file, { size: 1 << 20, compat: '0.10', clusterSize: 4096 });
    const img = await openImage(file, { readOnly: false });
    await img.write(0, new Uint8Array(50000).fill(4));
    await img.snapshots.create('x');
    await img.write(1000, new Uint8Array(10000).fill(5));
    await img.close();
    expectClean(file);
    expect(qemuRaw(file, t.dir, 'x').subarray(0, 50000).every((b) => b === 4)).toBe(true);
  });
});
