/**
 * Jobs on an image in use: random concurrent writes, zero-writes and model-checked reads on the
 * open image while stream, intermediate commit and active commit run (and after the pivot);
 * every read and the final images match the model, and `qemu-img check` is clean. Cancel
 * leaves the chain valid and unchanged in meaning.
 */
import { writeFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import type { Job } from '../../core/index.js';
import { openImage, type Image } from '../../plugins/qcow2/index.js';
import { runCommit, runStream } from '../../plugins/qcow2/jobs/index.js';
import { HAVE_QEMU, backingOf, check, compare, newManager, qimg, qio, rng, startJob, tempDir } from './jobs-support.js';

const SIZE = 16 << 20;
const cleanups: (() => void)[] = [];
afterAll(() => cleanups.forEach((c) => c()));

/** base (qcow2, data) ← mid (some data) ← top (some data), built by qemu-io. */
function buildChain(): string {
  const t = tempDir('jobs-live-');
  cleanups.push(t.cleanup);
  const d = t.dir;
  qimg(d, 'create', '-f', 'qcow2', 'base.qcow2', String(SIZE));
  qio(d, 'base.qcow2', ['write -P 1 0 6M', 'write -P 2 10M 3M']);
  qimg(d, 'create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2');
  qio(d, 'mid.qcow2', ['write -P 3 2M 3M', 'write -z 11M 512k', 'write -P 4 14M 1M']);
  qimg(d, 'create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2');
  qio(d, 'top.qcow2', ['write -P 5 1M 2M', 'write -z 12M 64k']);
  return d;
}

/** Random I/O on an open image against a byte model; overlapping requests are never in flight together. */
class Workload {
  readonly model: Uint8Array;
  private readonly busy: [number, number][] = [];
  private stopped = false;
  ops = 0;
  readsChecked = 0;

  constructor(private readonly image: Image, model: Uint8Array, private readonly seed: number) {
    this.model = model;
  }

  static async start(image: Image, seed: number): Promise<Workload> {
    const model = new Uint8Array(image.virtualSize);
    for (let p = 0; p < image.virtualSize; p += 1 << 20) model.set(await image.read(p, Math.min(1 << 20, image.virtualSize - p)), p);
    return new Workload(image, model, seed);
  }

  private claim(off: number, len: number): boolean {
    if (this.busy.some(([s, e]) => off < e && s < off + len)) return false;
    this.busy.push([off, off + len]);
    return true;
  }

  private free(off: number): void {
    this.busy.splice(this.busy.findIndex(([s]) => s === off), 1);
  }

  /** Run `workers` loops until stop(); resolves when they have all ended. */
  run(workers = 4): Promise<void> {
    return Promise.all(Array.from({ length: workers }, (_, w) => this.loop(rng(this.seed * 31 + w)))).then(() => undefined);
  }

  stop(): void {
    this.stopped = true;
  }

  private async loop(r: () => number): Promise<void> {
    while (!this.stopped) {
      const len = 1 + Math.floor(r() * 200_000);
      const off = Math.floor(r() * (this.image.virtualSize - len));
      if (!this.claim(off, len)) { await new Promise((res) => setImmediate(res)); continue; }
      try {
        const op = r();
        if (op < 0.45) {
          const data = new Uint8Array(len).fill(1 + Math.floor(r() * 250));
          data[0] = 0xee;
          await this.image.write(off, data);
          this.model.set(data, off);
        } else if (op < 0.55) {
          await this.image.writeZeroes(off, len);
          this.model.fill(0, off, off + len);
        } else {
          const got = await this.image.read(off, len);
          const want = this.model.subarray(off, off + len);
          if (!Buffer.from(got).equals(Buffer.from(want))) {
            throw new Error(`read ${off}+${len} differs from the model (op ${this.ops})`);
          }
          this.readsChecked++;
        }
        this.ops++;
      } finally {
        this.free(off);
      }
    }
  }

  /** Every byte of the image equals the model. */
  async verify(image: Image = this.image): Promise<void> {
    for (let p = 0; p < this.model.length; p += 1 << 20) {
      const n = Math.min(1 << 20, this.model.length - p);
      const got = Buffer.from(await image.read(p, n));
      expect(got.equals(Buffer.from(this.model.subarray(p, p + n))), `image bytes at ${p} match the model`).toBe(true);
    }
  }

  /** Write the model as a raw file for `qemu-img compare`. */
  saveRaw(path: string): void {
    writeFileSync(path, this.model);
  }
}

function waitFor(job: Job, status: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const check = () => {
      const s = job.info().status;
      if (s === status) { off(); resolve(); }
      else if (s === 'concluded') { off(); reject(new Error(`job concluded (${job.info().error?.message}) before ${status}`)); }
    };
    const off = job.on(check);
    check();
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe.skipIf(!HAVE_QEMU)('chain jobs on an image in use', () => {
  it('stream with live writers (paused and resumed once) ends equal to the model; qemu-img check clean', async () => {
    const d = buildChain();
    const img = await openImage(`${d}/top.qcow2`, { readOnly: false });
    const load = await Workload.start(img, 1);
    const running = load.run();
    const job = await startJob(newManager(), 'stream', (ctx) => runStream(img, {}, ctx), 12 << 20);
    await sleep(100);
    await job.pause();
    await sleep(100);
    await job.resume();
    const info = await job.result();
    await sleep(50);
    load.stop();
    await running;
    expect(info.progress.current).toBe(SIZE);
    expect(img.chain).toHaveLength(1);
    expect(load.ops).toBeGreaterThan(50);
    await load.verify();
    await img.close();
    load.saveRaw(`${d}/model.raw`);
    expect(backingOf(d, 'top.qcow2')).toBe('');
    expect(compare(d, 'top.qcow2', 'model.raw').status).toBe(0);
    expect(check(d, 'top.qcow2').status).toBe(0);
  });

  it('intermediate commit with live writers on the top: top re-pointed at base, equal to the model', async () => {
    const d = buildChain();
    const img = await openImage(`${d}/top.qcow2`, { readOnly: false });
    const load = await Workload.start(img, 2);
    const running = load.run();
    const job = await startJob(newManager(), 'commit', (ctx) => runCommit(img, { top: 'mid.qcow2' }, ctx), 8 << 20);
    await job.result();
    await sleep(50);
    load.stop();
    await running;
    expect(img.chain.map((c) => c.filename.split('/').pop())).toEqual(['top.qcow2', 'base.qcow2']);
    await load.verify();
    await img.close();
    load.saveRaw(`${d}/model.raw`);
    expect(backingOf(d, 'top.qcow2')).toBe('base.qcow2');
    expect(compare(d, 'top.qcow2', 'model.raw').status).toBe(0);
    expect(check(d, 'top.qcow2').status).toBe(0);
    expect(check(d, 'base.qcow2').status).toBe(0);
  });

  it('active commit: ready, kept in sync under writes, pivots on complete; writes after the pivot land in base', async () => {
    const d = buildChain();
    const img = await openImage(`${d}/top.qcow2`, { readOnly: false });
    const load = await Workload.start(img, 3);
    const running = load.run();
    const job = await startJob(newManager(), 'commit', (ctx) => runCommit(img, { active: true, base: 'base.qcow2' }, ctx));
    await waitFor(job, 'ready');
    const opsAtReady = load.ops;
    await sleep(150);
    expect(load.ops).toBeGreaterThan(opsAtReady);
    await job.complete();
    await job.result();
    // The same object is now the base, open read-write; writers never noticed.
    expect(img.path).toBe(`${d}/base.qcow2`);
    expect(img.chain).toHaveLength(1);
    const opsAtPivot = load.ops;
    await sleep(100);
    load.stop();
    await running;
    expect(load.ops).toBeGreaterThan(opsAtPivot);
    await load.verify();
    await img.close();
    load.saveRaw(`${d}/model.raw`);
    expect(compare(d, 'base.qcow2', 'model.raw').status).toBe(0);
    expect(check(d, 'base.qcow2').status).toBe(0);
    expect(check(d, 'top.qcow2').status).toBe(0);
  });

  it('cancel: stream, intermediate and active commit leave the chain valid and unchanged in meaning', async () => {
    for (const kind of ['stream', 'intermediate', 'active'] as const) {
      const d = buildChain();
      const img = await openImage(`${d}/top.qcow2`, { readOnly: false });
      const load = await Workload.start(img, 4);
      const running = load.run(2);
      const job = await startJob(newManager(), kind, (ctx) =>
        kind === 'stream' ? runStream(img, {}, ctx)
          : kind === 'intermediate' ? runCommit(img, { top: 'mid.qcow2' }, ctx)
            : runCommit(img, { active: true }, ctx), kind === 'active' ? 0 : 2 << 20);
      if (kind === 'active') await waitFor(job, 'ready'); else await sleep(300);
      await job.cancel();
      const info = await job.wait();
      expect(info.status).toBe('concluded');
      expect(info.error?.code, kind).toBe('Cancelled');
      await sleep(50);
      load.stop();
      await running;
      expect(img.path).toBe(`${d}/top.qcow2`);
      expect(img.chain.map((c) => c.filename.split('/').pop())).toEqual(['top.qcow2', 'mid.qcow2', 'base.qcow2']);
      await load.verify();
      await img.close();
      load.saveRaw(`${d}/model.raw`);
      expect(backingOf(d, 'top.qcow2')).toBe('mid.qcow2');
      expect(compare(d, 'top.qcow2', 'model.raw').status, kind).toBe(0);
      for (const f of ['top.qcow2', 'mid.qcow2', 'base.qcow2']) expect(check(d, f).status, `${kind}: check ${f}`).toBe(0);
    }
  });
});

