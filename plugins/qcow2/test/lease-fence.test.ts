/**
 * A job's writes into qcow2 images once its lease is lost. The native copy's fence
 * (CopyRangesOptions.until, BlockDevice.copyFrom's `until`): a job's
 * copy through the helper's threads writes nothing once the clock reaches the job's lease, which
 * its owner moves on while the copy runs (renewed) or sets to 0 (lost). A process stopped in the
 * middle of a copy window and woken past its lease would otherwise write the rest of the window
 * (up to 1 GiB) into space the runner that took the job over may be allocating. And the close
 * of an image a job wrote with deferred metadata (closeAfter): the run that lost its lease drops
 * what it held, so as not to write its stale tables over the other runner's.
 */
import { readFileSync, statSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { copyData, JobRun, LeaseLost } from '../../../core/index.js';
import { createImage, openImage } from '../index.js';
import { commitTask, runCommit } from '../jobs/index.js';
import { nativeCopyHonoursUntil } from '../engine/file.js';
import { imageDevice } from '../engine/image-device.js';
import { nativeAddon } from '../engine/native-addon.js';
import { hasQemu, qemuCheckJson, tempDir } from './helpers.js';

const MiB = 1 << 20;
const { dir, cleanup } = tempDir('offload-copy-fence-');
afterAll(cleanup);
const addon = nativeAddon();

/** A file of `mib` MiB of non-zero data, and an empty target beside it, opened for the helper. */
async function files(name: string, mib: number): Promise<{ src: number; dst: number; dstPath: string; close(): Promise<void> }> {
  const srcPath = join(dir, `${name}.src`);
  const dstPath = join(dir, `${name}.dst`);
  const s = await open(srcPath, 'w+');
  const chunk = new Uint8Array(MiB);
  for (let i = 0; i < mib; i++) await s.write(chunk.fill((i % 250) + 1), 0, MiB, i * MiB);
  const d = await open(dstPath, 'w+');
  return { src: s.fd, dst: d.fd, dstPath, close: async () => { await s.close(); await d.close(); } };
}

describe.skipIf(!addon || !nativeCopyHonoursUntil())('the native copy\'s fence (opts.until)', () => {
  it('past its time it writes nothing and rejects with ETIMEDOUT; with time left it copies all', async () => {
    const f = await files('past', 8);
    try {
      const ops = Float64Array.of(0, 0, 8 * MiB);
      await expect(addon!.copyRanges(f.src, f.dst, ops, { block: 0, until: Float64Array.of(Date.now() - 1) })).rejects.toMatchObject({
        code: 'ETIMEDOUT', message: expect.stringMatching(/^fence/),
      });
      expect(statSync(f.dstPath).size).toBe(0);
      await addon!.copyRanges(f.src, f.dst, ops, { block: 0, until: Float64Array.of(Date.now() + 60_000) });
      expect(statSync(f.dstPath).size).toBe(8 * MiB);
      expect(() => addon!.copyRanges(f.src, f.dst, ops, { block: 0, until: new Float64Array(0) })).toThrow(/opts\.until must be a Float64Array/);
    } finally {
      await f.close();
    }
  });

  it('reads the time again before each piece: set to 0 while the copy runs, it stops part-way', async () => {
    const f = await files('moved', 512);
    try {
      const until = Float64Array.of(Date.now() + 60_000);
      const copy = addon!.copyRanges(f.src, f.dst, Float64Array.of(0, 0, 512 * MiB), { block: 0, until });
      await new Promise((r) => setTimeout(r, 20));
      until[0] = 0; // the lease lost, from JavaScript, while the helper's threads copy
      await expect(copy).rejects.toMatchObject({ code: 'ETIMEDOUT' });
      const written = statSync(f.dstPath).size;
      expect(written).toBeGreaterThan(0);
      expect(written).toBeLessThan(512 * MiB);
      // Nothing more lands afterwards.
      await new Promise((r) => setTimeout(r, 50));
      expect(statSync(f.dstPath).size).toBe(written);
    } finally {
      await f.close();
    }
  });

  it('a job\'s clone into a qcow2 image: its lease lost mid-window, the copy stops with LeaseLost and claims nothing it wrote', async () => {
    const srcPath = join(dir, 'clone-src.qcow2');
    const dstPath = join(dir, 'clone-dst.qcow2');
    await createImage(srcPath, { size: 512 * MiB });
    const w = await openImage(srcPath, { readOnly: false });
    for (let i = 0; i < 512; i += 1) await w.write(i * MiB, new Uint8Array(MiB).fill((i % 250) + 1));
    await w.close();
    await createImage(dstPath, { size: 512 * MiB });
    const srcImg = await openImage(srcPath);
    const dstImg = await openImage(dstPath, { readOnly: false });
    const src = await imageDevice(srcImg, { mode: 'r' });
    const dst = await imageDevice(dstImg, { mode: 'rw' });
    const leaseUntil = Float64Array.of(Date.now() + 60_000);
    const run = new JobRun({ jobId: 'clone', leaseUntil, mayContinue: () => Date.now() < leaseUntil[0]! });
    const copying = copyData(src, dst, run, { targetFresh: true });
    await new Promise((r) => setTimeout(r, 30));
    leaseUntil[0] = 0;
    await expect(copying).rejects.toBeInstanceOf(LeaseLost);
    const sizeAfter = statSync(dstPath).size;
    expect(sizeAfter).toBeLessThan(512 * MiB); // it stopped part-way through its window
    await new Promise((r) => setTimeout(r, 50));
    expect(statSync(dstPath).size).toBe(sizeAfter);
    // Nothing of what the helper wrote is referenced: the target reads as zeros everywhere.
    expect((await dst.extents()).every((e) => e.kind !== 'data')).toBe(true);
    await dst.close();
    await src.close();
    await dstImg.close();
    await srcImg.close();
    if (hasQemu) expect(qemuCheckJson(dstPath).status).toBe(0);
  });
});

async function readAll(path: string): Promise<Buffer> {
  const img = await openImage(path);
  try {
    return Buffer.from(await img.read(0, img.virtualSize));
  } finally {
    await img.close();
  }
}

describe('a job that lost its lease closes its image writing nothing more', () => {
  it('a commit into a base with deferred metadata: what it held unflushed when the lease ran out never reaches the base; it checks clean', async () => {
    const basePath = join(dir, 'commit-base.qcow2');
    const topPath = join(dir, 'commit-top.qcow2');
    await createImage(basePath, { size: 64 * MiB });
    const b = await openImage(basePath, { readOnly: false });
    await b.write(48 * MiB, new Uint8Array(16 * MiB).fill(1));
    await b.close();
    const before = await readAll(basePath);
    await createImage(topPath, { size: 64 * MiB, backingFile: 'commit-base.qcow2', backingFormat: 'qcow2' });
    const t = await openImage(topPath, { readOnly: false });
    await t.write(0, new Uint8Array(48 * MiB).fill(2));
    await t.close();
    // 4 MiB/s: chunks are committed after the first checkpoint's save (the only one: the next
    // would be an hour later) until the lease runs out.
    const until = Date.now() + 3500;
    const saved: { offset: number }[] = [];
    const run = new JobRun({
      jobId: 'commit', speed: 4 * MiB, checkpointEveryMs: 3_600_000, mayContinue: () => Date.now() < until,
      onSave: (state) => void saved.push(state as { offset: number }),
    });
    await expect(commitTask(topPath).run(run)).rejects.toBeInstanceOf(LeaseLost);
    // The one flush (the first save's) wrote the tables of the AHEAD (4) chunks applied by
    // then; chunks were committed after it, their tables held, then dropped at the close.
    expect(saved).toEqual([{ offset: 4 * MiB }]);
    expect(run.progress.current).toBeGreaterThanOrEqual(8 * MiB); // chunk 1 settled: chunk 4 was applied before it
    const after = await readAll(basePath);
    expect(after.subarray(0, 16 * MiB).every((x) => x === 2)).toBe(true);
    expect(after.subarray(16 * MiB).equals(before.subarray(16 * MiB))).toBe(true);
    if (hasQemu) expect(qemuCheckJson(basePath).status).toBe(0);
  });

  it('an active commit, ready, whose lease ran out: a guest write after it is not copied into the base, and the job stops with LeaseLost', async () => {
    const basePath = join(dir, 'active-base.qcow2');
    const topPath = join(dir, 'active-top.qcow2');
    await createImage(basePath, { size: 16 * MiB });
    await createImage(topPath, { size: 16 * MiB, backingFile: 'active-base.qcow2', backingFormat: 'qcow2' });
    const img = await openImage(topPath, { readOnly: false });
    await img.write(0, new Uint8Array(2 * MiB).fill(3));
    let ready!: () => void;
    const isReady = new Promise<void>((r) => { ready = r; });
    let held = true;
    const run = new JobRun({ jobId: 'active', mayContinue: () => held, onReady: () => ready() });
    const job = runCommit(img, { active: true }, run);
    job.catch(() => undefined);
    await isReady;
    const before = readFileSync(basePath);
    held = false; // the lease ran out (the process was stopped past it)
    await img.write(8 * MiB, new Uint8Array(MiB).fill(5)); // the guest writes on: the mirror sees it dirty
    await expect(job).rejects.toBeInstanceOf(LeaseLost);
    expect(readFileSync(basePath).equals(before)).toBe(true);
    await img.close();
  });
});
