/**
 * The chain jobs through their public API on chains made by our own engine (no qemu needed):
 * typed errors for bad requests, resume from a checkpoint, the dirty map, task params, raw copy.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { Cancelled, FailedPrecondition, InvalidArgument, JobRun, NotFound, Unsupported } from '../../../core/index.js';
import { createImage, openImage, type Image } from '../index.js';
import { tempDir } from './helpers.js';
import { commitTask, copyToRaw, makeEmpty, rebaseTask, runCommit, runRebase, runStream, streamTask } from '../jobs/index.js';

const M = 1 << 20;
const cleanups: (() => void)[] = [];
afterEach(() => { for (const c of cleanups.splice(0)) c(); });

/** A job run that saves every checkpoint (kept in `states`) and is cancelled at its `cancelAfter`-th checkpoint. */
class TestRun extends JobRun {
  readonly states: unknown[];
  private checkpoints = 0;

  constructor(resumeFrom: unknown, private readonly cancelAfter: number) {
    const states: unknown[] = [];
    super({ jobId: 't', resumeFrom, checkpointEveryMs: 0, onSave: (s) => void states.push(s) });
    this.states = states;
  }

  get current(): number { return this.progress.current; }
  get total(): number { return this.progress.total; }

  override async checkpoint(n: number, state?: unknown): Promise<void> {
    await super.checkpoint(n, state);
    if (++this.checkpoints >= this.cancelAfter) throw new Cancelled('cancelled by the test');
  }
}

function context(resumeFrom?: unknown, cancelAfter = Infinity): TestRun {
  return new TestRun(resumeFrom, cancelAfter);
}

/** base (data 0–6M, pattern 1) ← top (data 2–3M, pattern 2), 12 MiB. */
async function chain(): Promise<string> {
  const t = tempDir('jobs-unit-');
  cleanups.push(t.cleanup);
  const d = t.dir;
  await createImage(`${d}/base.qcow2`, { size: 12 * M });
  const b = await openImage(`${d}/base.qcow2`, { readOnly: false });
  await b.write(0, new Uint8Array(6 * M).fill(1));
  await b.close();
  await createImage(`${d}/top.qcow2`, { backingFile: 'base.qcow2', backingFormat: 'qcow2' });
  const t2 = await openImage(`${d}/top.qcow2`, { readOnly: false });
  await t2.write(2 * M, new Uint8Array(M).fill(2));
  await t2.close();
  return d;
}

async function bytes(img: Image): Promise<Buffer> {
  return Buffer.from(await img.read(0, img.virtualSize));
}

describe('chain jobs: bad requests are typed errors and change nothing', () => {
  it('stream/commit/rebase refuse what they cannot do', async () => {
    const d = await chain();
    const ro = await openImage(`${d}/top.qcow2`);
    await expect(runStream(ro, {}, context())).rejects.toBeInstanceOf(FailedPrecondition);
    await ro.close();
    const img = await openImage(`${d}/top.qcow2`, { readOnly: false });
    const before = await bytes(img);
    await expect(runStream(img, { base: 'nope.qcow2' }, context())).rejects.toBeInstanceOf(NotFound);
    await expect(runStream(img, { base: 'top.qcow2' }, context())).rejects.toBeInstanceOf(InvalidArgument);
    await expect(runCommit(img, { top: 'base.qcow2' }, context())).rejects.toBeInstanceOf(FailedPrecondition);
    await expect(runCommit(img, { top: 'top.qcow2', base: 'top.qcow2' }, context())).rejects.toBeInstanceOf(InvalidArgument);
    await expect(runRebase(img, { backing: 'missing.qcow2', backingFormat: 'qcow2' }, context())).rejects.toBeInstanceOf(NotFound);
    await expect(runRebase(img, { backing: 'base.qcow2', backingFormat: 'vmdk' }, context())).rejects.toBeInstanceOf(InvalidArgument);
    expect((await bytes(img)).equals(before)).toBe(true);
    expect(img.chain).toHaveLength(2);
    await img.close();

    const raw = `${d}/disk.raw`;
    await createImage(raw, { format: 'raw', size: M });
    const r = await openImage(raw, { readOnly: false });
    await expect(runStream(r, {}, context())).rejects.toBeInstanceOf(Unsupported);
    await expect(makeEmpty(r)).rejects.toBeInstanceOf(Unsupported);
    await r.close();
  });

  it('a cancelled stream leaves the chain as it was; a run resumed from its checkpoint completes it', async () => {
    const d = await chain();
    const img = await openImage(`${d}/top.qcow2`, { readOnly: false });
    const before = await bytes(img);
    const first = context(undefined, 1);
    await expect(runStream(img, {}, first)).rejects.toBeInstanceOf(Cancelled);
    expect(img.chain).toHaveLength(2);
    expect((await bytes(img)).equals(before)).toBe(true);
    expect(first.states).toEqual([{ offset: 4 * M }]);

    const second = context(first.states[0]);
    const startedAt: number[] = [];
    const setProgress = second.setProgress.bind(second);
    second.setProgress = (c, t) => { startedAt.push(c); setProgress(c, t); };
    await runStream(img, {}, second);
    // Resumed: it started at the checkpoint, not at zero. (The first run had already filled 4–6M
    // when it was cancelled, so the rest is one stretch with nothing to do.)
    expect(startedAt[0]).toBe(4 * M);
    expect(second.states).toEqual([{ offset: 12 * M }]);
    expect(second.current).toBe(12 * M);
    expect(img.chain).toHaveLength(1);
    expect(img.header!.backingFile).toBeUndefined();
    expect((await bytes(img)).equals(before)).toBe(true);
    await img.close();
    const again = await openImage(`${d}/top.qcow2`);
    expect(again.backing).toBeUndefined();
    expect((await bytes(again)).equals(before)).toBe(true);
    expect((await again.check()).corruptions).toBe(0);
    await again.close();
  });

  it('a foreign or damaged checkpoint means starting over', async () => {
    for (const bad of [{ offset: -4 }, { offset: 'x' }, { offset: 1e18 }, 'junk', null]) {
      const d = await chain();
      const img = await openImage(`${d}/top.qcow2`, { readOnly: false });
      const before = await bytes(img);
      const ctx = context(bad);
      await runStream(img, {}, ctx);
      expect(ctx.states[0]).toEqual({ offset: 4 * M });
      expect((await bytes(img)).equals(before)).toBe(true);
      await img.close();
      for (const c of cleanups.splice(0)) c();
    }
  });
});

describe('chain jobs as tasks', () => {
  it('params are plain JSON and enough to rebuild the task', async () => {
    expect(JSON.parse(JSON.stringify(streamTask('/p/top.qcow2', { base: 'b.qcow2' }).params))).toEqual({ path: '/p/top.qcow2', base: 'b.qcow2' });
    expect(commitTask('/p/top.qcow2', { empty: true }).params).toEqual({ path: '/p/top.qcow2', empty: true });
    expect(rebaseTask('/p/t', { backing: '', unsafe: true }).params).toEqual({ path: '/p/t', backing: '', unsafe: true });
  });

  it('commitTask commits and empties; the chain reads the same and base holds the data', async () => {
    const d = await chain();
    const img = await openImage(`${d}/top.qcow2`);
    const before = await bytes(img);
    await img.close();
    await commitTask(`${d}/top.qcow2`, { empty: true }).run(context());
    const top = await openImage(`${d}/top.qcow2`);
    expect((await bytes(top)).equals(before)).toBe(true);
    expect((await top.map()).every((s) => s.depth > 0 || !s.data)).toBe(true);
    await top.close();
    const base = await openImage(`${d}/base.qcow2`);
    expect((await bytes(base)).equals(before)).toBe(true);
    await base.close();
  });
});

describe('chain jobs over a raw base (through the engine\'s block-job surface)', () => {
  /** base.raw (0–2M data) ← low.qcow2 (2–3M) ← mid.qcow2 (3–4M, zeros 1–2M) ← top.qcow2 (4–5M), 8 MiB. */
  async function rawBased(): Promise<string> {
    const tmp = tempDir('jobs-raw-');
    cleanups.push(tmp.cleanup);
    const d = tmp.dir;
    writeFileSync(`${d}/base.raw`, Buffer.concat([Buffer.alloc(2 * M, 7), Buffer.alloc(6 * M)]));
    let below = 'base.raw';
    for (const [name, at, zero] of [['low', 2, 0], ['mid', 3, 1], ['top', 4, 0]] as const) {
      await createImage(`${d}/${name}.qcow2`, { backingFile: below, backingFormat: below.endsWith('.raw') ? 'raw' : 'qcow2' });
      const img = await openImage(`${d}/${name}.qcow2`, { readOnly: false });
      await img.write(at * M, new Uint8Array(M).fill(at));
      if (zero) await img.writeZeroes(zero * M, M);
      await img.close();
      below = `${name}.qcow2`;
    }
    return d;
  }

  it('stream down to the raw base, then flatten', async () => {
    const d = await rawBased();
    const img = await openImage(`${d}/top.qcow2`, { readOnly: false });
    const before = await bytes(img);
    await runStream(img, { base: 'base.raw' }, context());
    expect(img.chain.map((c) => c.format)).toEqual(['qcow2', 'raw']);
    expect(img.header!.backingFile).toBe('base.raw');
    expect(img.header!.backingFormat).toBe('raw');
    expect((await bytes(img)).equals(before)).toBe(true);
    await runStream(img, {}, context());
    expect(img.chain).toHaveLength(1);
    expect((await bytes(img)).equals(before)).toBe(true);
    await img.close();
    const again = await openImage(`${d}/top.qcow2`);
    expect((await bytes(again)).equals(before)).toBe(true);
    expect((await again.check()).corruptions).toBe(0);
    await again.close();
  });

  it('commit into the raw base (plain and intermediate, re-pointing a read-only layer of the chain)', async () => {
    const d = await rawBased();
    const img = await openImage(`${d}/top.qcow2`, { readOnly: false });
    const before = await bytes(img);
    // Intermediate: low and mid go into base.raw, and top (the image in use) is re-pointed at it.
    expect(await runCommit(img, { top: 'mid.qcow2', base: 'base.raw' }, context())).toBe(false);
    expect(img.chain.map((c) => c.filename.split('/').pop())).toEqual(['top.qcow2', 'base.raw']);
    expect((await bytes(img)).equals(before)).toBe(true);
    await img.close();
    const raw = readFileSync(`${d}/base.raw`);
    expect(raw.subarray(0, M).every((x) => x === 7)).toBe(true);
    expect(raw.subarray(M, 2 * M).every((x) => x === 0)).toBe(true); // mid's zero clusters committed
    expect(raw.subarray(2 * M, 3 * M).every((x) => x === 2)).toBe(true);
    expect(raw.subarray(3 * M, 4 * M).every((x) => x === 3)).toBe(true);

    // A layer below the top is re-pointed while it is open read-only inside the chain.
    const d2 = await rawBased();
    const img2 = await openImage(`${d2}/top.qcow2`, { readOnly: false });
    const before2 = await bytes(img2);
    await runCommit(img2, { top: 'low.qcow2', base: 'base.raw' }, context());
    expect(img2.chain.map((c) => c.filename.split('/').pop())).toEqual(['top.qcow2', 'mid.qcow2', 'base.raw']);
    expect(img2.backing!.readOnly).toBe(true);
    expect((await bytes(img2)).equals(before2)).toBe(true);
    // Plain commit of the top into its (qcow2) backing, then of that into the raw base.
    await runCommit(img2, {}, context());
    await img2.close();
    const mid = await openImage(`${d2}/mid.qcow2`, { readOnly: false });
    expect((await bytes(mid)).equals(before2)).toBe(true);
    await runCommit(mid, {}, context());
    await mid.close();
    expect(readFileSync(`${d2}/base.raw`).equals(before2)).toBe(true);
  });
});

describe('active commit', () => {
  it('starts over when resumed: the writes its last run tracked were lost with it, a saved offset would skip them', async () => {
    const d = await chain();
    const img = await openImage(`${d}/top.qcow2`, { readOnly: false });
    // Written after an earlier run had passed this offset (and tracked only in its memory).
    await img.write(M, new Uint8Array(M).fill(8));
    const before = await bytes(img);
    expect(await runCommit(img, { active: true, pivotWhenReady: true }, context({ offset: 8 * M }))).toBe(true);
    expect(img.path).toBe(`${d}/base.qcow2`);
    expect((await bytes(img)).equals(before)).toBe(true);
    await img.close();
    const base = await openImage(`${d}/base.qcow2`);
    expect((await bytes(base)).equals(before)).toBe(true);
    await base.close();
  });
});

describe('large sparse images', () => {
  /** 4 GiB virtual: base data at 1 GiB + 5 MiB and near the end, top data at 3 GiB. */
  async function sparseChain(): Promise<string> {
    const t = tempDir('jobs-sparse-');
    cleanups.push(t.cleanup);
    const d = t.dir;
    const G = 1 << 30;
    await createImage(`${d}/base.qcow2`, { size: 4 * G });
    const b = await openImage(`${d}/base.qcow2`, { readOnly: false });
    await b.write(G + 5 * M, new Uint8Array(M).fill(1));
    await b.write(4 * G - M, new Uint8Array(M).fill(3));
    await b.close();
    await createImage(`${d}/top.qcow2`, { backingFile: 'base.qcow2', backingFormat: 'qcow2' });
    const top = await openImage(`${d}/top.qcow2`, { readOnly: false });
    await top.write(3 * G, new Uint8Array(M).fill(2));
    await top.close();
    return d;
  }

  /** Guest content as a digest of its non-zero 1 MiB blocks (the image is too large to hold). */
  async function content(img: Image): Promise<string[]> {
    const out: string[] = [];
    for (const s of await img.map()) {
      if (!s.data) continue;
      const data = Buffer.from(await img.read(s.start, s.length));
      out.push(`${s.start}:${data.toString('base64').length}:${data[0]}:${data[data.length - 1]}`);
    }
    return out;
  }

  it('stream and commit skip empty stretches in a few steps, not one per chunk, and copy what is there', async () => {
    const d = await sparseChain();
    const img = await openImage(`${d}/top.qcow2`, { readOnly: false });
    const before = await content(img);
    expect(before).toHaveLength(3);
    const ctx = context();
    await runStream(img, {}, ctx);
    expect(ctx.current).toBe(4 * 2 ** 30);
    // 1024 chunks of 4 MiB; data in two of them, the rest skipped a window at a time.
    expect(ctx.states.length).toBeLessThan(40);
    expect(await content(img)).toEqual(before);
    expect(img.chain).toHaveLength(1);
    await img.close();

    const d2 = await sparseChain();
    const top = await openImage(`${d2}/top.qcow2`);
    const chainBefore = await content(top);
    await top.close();
    const c2 = context();
    await commitTask(`${d2}/top.qcow2`, { empty: false }).run(c2);
    expect(c2.states.length).toBeLessThan(40);
    const base = await openImage(`${d2}/base.qcow2`);
    expect(await content(base)).toEqual(chainBefore);
    expect((await base.check()).corruptions).toBe(0);
    await base.close();
  });
});

describe('copy into raw', () => {
  it('writes the chain content, leaves zeros as holes, and removes its progress file; a stale progress file of another source is ignored', async () => {
    const d = await chain();
    const target = `${d}/out.raw`;
    const { writeFileSync, existsSync } = await import('node:fs');
    writeFileSync(`${target}.progress`, JSON.stringify({ magic: 'offload-raw-progress', version: 1, source: '/elsewhere', size: 1, granularity: 1 }));
    const src = await openImage(`${d}/top.qcow2`);
    const ctx = context();
    await copyToRaw(src, target, ctx);
    expect(Buffer.from(readFileSync(target)).equals(await bytes(src))).toBe(true);
    expect(ctx.current).toBe(6 * M); // progress counts data bytes, as every copy does (0–6M)
    expect(ctx.total).toBe(6 * M);
    expect(existsSync(`${target}.progress`)).toBe(false);
    await expect(copyToRaw(src, `${d}/top.qcow2`, context())).rejects.toBeInstanceOf(InvalidArgument);
    await src.close();
  });
});

describe('DirtyMap (Image.trackWrites)', () => {
  it('marks ranges at its granularity, hands them out once, and wakes a waiter', async () => {
    const t = tempDir('jobs-dirty-');
    cleanups.push(t.cleanup);
    const d = t.dir;
    await createImage(`${d}/t.qcow2`, { size: 4 * M });
    const img = await openImage(`${d}/t.qcow2`, { readOnly: false });
    const m = img.trackWrites(64 * 1024);
    expect(m.empty()).toBe(true);
    const woke = m.changed();
    await img.write(100, new Uint8Array(10));
    await woke;
    m.mark(64 * 1024 * 3 - 1, 2);
    m.mark(5 * M, 1); // past the size it was made for: grows
    expect(m.takeAll(M)).toEqual([
      { start: 0, end: 65536 },
      { start: 131072, end: 262144 },
      { start: 5 * M, end: 5 * M + 65536 },
    ]);
    expect(m.empty()).toBe(true);
    expect(m.takeAll(M)).toEqual([]);
    m.mark(0, 4 * M);
    expect(m.takeAll(M)).toHaveLength(4);
    m.stop();
    await img.write(0, new Uint8Array(10));
    expect(m.empty()).toBe(true);
    await img.close();
  });
});
