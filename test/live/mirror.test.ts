/**
 * The live layer's pieces (core/live/): the dirty map, the device a live job watches and switches,
 * and the mirror — run against devices that answer after random delays, so that guest writes,
 * the copier's reads and its writes interleave, with a model of every write the writer saw
 * acknowledged.
 */
import { describe, expect, it } from 'vitest';
import type { BlockDevice } from '../../core/index.js';
import { DirtyMap } from '../../core/live/dirty-map.js';
import { Fill } from '../../core/live/fill.js';
import { LiveDevice } from '../../core/live/live-device.js';
import { Mirror } from '../../core/live/mirror.js';
import { RangeLocks } from '../../core/live/range-locks.js';
import { memoryDevice } from '../support/memory-device.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** A small deterministic PRNG (mulberry32), so a failure can be replayed from its seed. */
function rng(seed: number): (n: number) => number {
  let a = seed >>> 0;
  return (n) => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return Math.floor((((t ^ (t >>> 14)) >>> 0) / 4294967296) * n);
  };
}

/** `dev` answering every call after 0–`ms` ms, before and after the work: requests overlap as on a real device. */
function slow(dev: BlockDevice, ms: number, seed: number): BlockDevice {
  const r = rng(seed);
  const pause = () => new Promise<void>((res) => (r(3) === 0 ? setImmediate(res) : setTimeout(res, r(ms + 1))));
  const wrap = <A extends unknown[], T>(f: (...a: A) => Promise<T>) => async (...a: A): Promise<T> => {
    await pause();
    const out = await f(...a);
    await pause();
    return out;
  };
  return {
    sizeBytes: dev.sizeBytes,
    blockSize: dev.blockSize,
    read: wrap((o: number, l: number) => dev.read(o, l)),
    write: wrap((o: number, d: Uint8Array) => dev.write(o, d)),
    writeZeroes: wrap((o: number, l: number) => dev.writeZeroes!(o, l)),
    extents: wrap((o?: number, l?: number) => dev.extents(o, l)),
    flush: wrap(() => dev.flush()),
    close: () => dev.close(),
  };
}

/** Writes random data at random places through `dev` until stopped, keeping what each acknowledged write left in `model`. */
function writer(dev: BlockDevice, model: Uint8Array, seed: number, o: { maxBytes?: number; zeroes?: boolean; region?: { offset: number; length: number } } = {}) {
  const r = rng(seed);
  const region = o.region ?? { offset: 0, length: model.length };
  let stop = false;
  let writes = 0;
  const done = (async () => {
    while (!stop) {
      const length = 1 + r(o.maxBytes ?? 20 * KiB);
      const offset = region.offset + r(region.length - length);
      if (o.zeroes && r(8) === 0) {
        await dev.writeZeroes!(offset, length);
        model.fill(0, offset, offset + length);
      } else {
        const data = new Uint8Array(length).fill(1 + r(255));
        data[0] = r(256);
        await dev.write(offset, data);
        model.set(data, offset);
      }
      writes++;
    }
  })();
  return { stop: async () => { stop = true; await done; }, get writes() { return writes; } };
}

async function fill(dev: BlockDevice, model: Uint8Array, seed: number, chunks: number): Promise<void> {
  const r = rng(seed);
  for (let i = 0; i < chunks; i++) {
    const offset = r(model.length / (64 * KiB)) * 64 * KiB;
    const data = new Uint8Array(64 * KiB).fill(1 + r(255));
    await dev.write(offset, data);
    model.set(data, offset);
  }
}

const same = (a: Uint8Array, b: Uint8Array) => Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0;

describe('DirtyMap', () => {
  it('marks and clears whole granules, finds runs (wrapping), and counts bytes with a short last granule', () => {
    const m = new DirtyMap(10 * 64 * KiB + 100, 64 * KiB);
    expect(m.next()).toBeUndefined();
    m.mark(64 * KiB - 1, 2); // touches granules 0 and 1
    m.mark(10 * 64 * KiB + 99, 1); // the short last granule
    expect(m.dirtyGranules).toBe(3);
    expect(m.dirtyBytes).toBe(2 * 64 * KiB + 100);
    expect(m.ranges()).toEqual([{ offset: 0, length: 128 * KiB }, { offset: 640 * KiB, length: 100 }]);
    expect(m.next(128 * KiB)).toEqual({ offset: 640 * KiB, length: 100 });
    expect(m.next(m.sizeBytes)).toEqual({ offset: 0, length: 128 * KiB }); // wraps
    expect(m.next(0, 64 * KiB)).toEqual({ offset: 0, length: 64 * KiB }); // at most maxBytes
    expect(m.isDirty(128 * KiB, 64 * KiB)).toBe(false);
    m.clear(0, 1);
    expect(m.ranges()[0]).toEqual({ offset: 64 * KiB, length: 64 * KiB });
    m.mark(0, 0);
    expect(m.dirtyGranules).toBe(2);
    let marks = 0;
    m.onMark = () => marks++;
    m.mark(64 * KiB, 1); // already dirty: no news
    m.mark(200 * KiB, 1);
    expect(marks).toBe(1);
    // The runs still dirty inside a range (what a copy takes once it holds the range's lock).
    expect(m.runsIn(0, 640 * KiB)).toEqual([{ offset: 64 * KiB, length: 64 * KiB }, { offset: 192 * KiB, length: 64 * KiB }]);
    expect(m.runsIn(100 * KiB, 10)).toEqual([{ offset: 64 * KiB, length: 64 * KiB }]);
    expect(m.runsIn(128 * KiB, 64 * KiB)).toEqual([]);
  });

  it('refuses a granularity that is not a power of two ≥ 512, and ranges outside it', () => {
    expect(() => new DirtyMap(MiB, 1000)).toThrow(expect.objectContaining({ code: 'InvalidArgument' }));
    expect(() => new DirtyMap(MiB, 256)).toThrow(expect.objectContaining({ code: 'InvalidArgument' }));
    const m = new DirtyMap(MiB);
    expect(() => m.mark(MiB - 1, 2)).toThrow(expect.objectContaining({ code: 'InvalidArgument' }));
    expect(() => m.mark(-1, 1)).toThrow(expect.objectContaining({ code: 'InvalidArgument' }));
  });

  it('finds far runs in a large map by skipping clean words (a 1 TiB device at 64 KiB: 16 M granules)', () => {
    const m = new DirtyMap(2 ** 40);
    m.mark(2 ** 40 - 1, 1);
    expect(m.next()).toEqual({ offset: 2 ** 40 - 64 * KiB, length: 64 * KiB });
  });
});

describe('LiveDevice', () => {
  it('marks a write once it has landed; holds requests while paused and waits for those in flight; switches only while paused', async () => {
    const a = memoryDevice(4 * MiB);
    const b = memoryDevice(4 * MiB);
    const live = new LiveDevice(slow(a, 3, 1));
    const map = new DirtyMap(4 * MiB);
    live.watch(map);
    let landed = false;
    const w = live.write(100 * KiB, new Uint8Array(10).fill(7)).then(() => { landed = true; });
    expect(map.dirtyGranules).toBe(0); // not before it lands
    await w;
    expect(landed).toBe(true);
    expect(map.ranges()).toEqual([{ offset: 64 * KiB, length: 64 * KiB }]);
    expect(() => live.switchTo(b)).toThrow(expect.objectContaining({ code: 'FailedPrecondition' }));

    const inFlight = live.write(0, new Uint8Array(4).fill(9));
    let later = false;
    const old = await live.paused(async () => {
      // The write that was in flight has landed on the old device; the one sent meanwhile waits.
      expect([...(await a.read(0, 4))]).toEqual([9, 9, 9, 9]);
      void live.write(8, new Uint8Array(4).fill(5)).then(() => { later = true; });
      await new Promise((r) => setTimeout(r, 20));
      expect(later).toBe(false);
      return live.switchTo(b);
    });
    await inFlight;
    await new Promise((r) => setTimeout(r, 20));
    expect(later).toBe(true);
    expect(old).not.toBe(b);
    expect([...(await b.read(8, 4))]).toEqual([5, 5, 5, 5]); // sent during the pause: went to the new device
    expect([...(await a.read(8, 4))]).toEqual([0, 0, 0, 0]);
  });
});

describe('LiveDevice, write-blocking', () => {
  it('writes both sides at once; a write the source refuses fails for the guest and leaves its range to be copied again (the target may have it)', async () => {
    const src = memoryDevice(1 << 20);
    const dst = memoryDevice(1 << 20);
    let refuse = false;
    let inFlight = 0;
    let most = 0;
    const slow = (d: BlockDevice, fail: () => boolean): BlockDevice => ({
      ...d,
      write: async (o, data) => {
        inFlight++;
        most = Math.max(most, inFlight);
        await new Promise((r) => setTimeout(r, 5));
        inFlight--;
        if (fail()) throw new Error('the source refused the write');
        await d.write(o, data);
      },
    });
    const live = new LiveDevice(slow(src, () => refuse));
    const map = new DirtyMap(1 << 20);
    live.watch(map);
    live.setSyncTarget({ device: slow(dst, () => false), locks: new RangeLocks(map.granularity) });
    await live.write(0, new Uint8Array(4096).fill(1));
    expect(most).toBe(2); // both sides at once
    expect(map.isDirty(0, 4096)).toBe(false);
    refuse = true;
    await expect(live.write(128 * 1024, new Uint8Array(4096).fill(2))).rejects.toThrow('the source refused the write');
    expect(map.isDirty(128 * 1024, 4096)).toBe(true);
    expect([...(await dst.read(128 * 1024, 4))]).toEqual([2, 2, 2, 2]); // the target has it: the mark sends the source's data there again
  });
});

describe('Mirror', () => {
  for (const mode of ['background', 'write-blocking'] as const) {
    it(`${mode}: ready while a writer runs, pivot while it runs, the target holds every acknowledged write`, async () => {
      const size = 8 * MiB;
      const model = new Uint8Array(size);
      const src = memoryDevice(size);
      const dst = memoryDevice(size);
      const live = new LiveDevice(slow(src, 2, 11));
      await fill(live, model, 5, 40);
      const w = writer(live, model, mode === 'background' ? 21 : 22, { zeroes: true });
      const mirror = new Mirror(live, slow(dst, 2, 12), { mode, chunkBytes: 256 * KiB });
      await mirror.start();
      await mirror.whenReady();
      const atReady = w.writes;
      await new Promise((r) => setTimeout(r, 100)); // ready, and writes go on
      expect(w.writes).toBeGreaterThan(atReady);
      const old = await mirror.pivot();
      expect(old).not.toBe(live.current);
      const afterPivot = w.writes;
      await new Promise((r) => setTimeout(r, 100));
      await w.stop();
      expect(w.writes).toBeGreaterThan(afterPivot); // the writer never saw an error or a stall
      expect(same(await dst.read(0, size), model)).toBe(true);
      expect(same(await live.read(0, size), model)).toBe(true);
    });
  }

  for (const mode of ['background', 'write-blocking'] as const) {
    it(`${mode}: four writers hammering a small device in small granules, then a pivot while they write: nothing lost`, async () => {
      const size = 1 * MiB;
      for (const seed of [1, 2, 3]) {
        const model = new Uint8Array(size);
        const src = memoryDevice(size, { blockSize: 4 * KiB });
        const dst = memoryDevice(size, { blockSize: 4 * KiB });
        const live = new LiveDevice(slow(src, 1, seed * 100));
        await fill(live, model, seed, 48); // most of it allocated: a long bulk pass, while write-blocking writers write
        const mirror = new Mirror(live, slow(dst, 2, seed * 100 + 1), { mode, granularity: 4 * KiB, chunkBytes: 8 * KiB, concurrency: 4 });
        const start = () => [0, 1, 2, 3].map((i) => writer(live, model, seed * 10 + i, { maxBytes: 6 * KiB, region: { offset: i * 256 * KiB, length: 256 * KiB } }));
        // Background mode cannot converge under four unthrottled writers (that is what write-blocking is for): they start once it is ready.
        let ws = mode === 'write-blocking' ? start() : [];
        await mirror.start();
        await mirror.whenReady();
        if (ws.length === 0) ws = start();
        await new Promise((r) => setTimeout(r, 300));
        await mirror.pivot();
        await Promise.all(ws.map((w) => w.stop()));
        if (mode === 'background') expect(mirror.bytesCopied).toBeGreaterThan(size); // copied again while written
        else expect(mirror.dirtyBytes).toBe(0);
        const got = await dst.read(0, size);
        const firstBad = got.findIndex((b, i) => b !== model[i]);
        expect(firstBad, `seed ${seed}: the target differs from every acknowledged write at byte ${firstBad}`).toBe(-1);
      }
    });
  }

  it('write-blocking: once ready, nothing becomes dirty while writes go on (it converges under any write rate)', async () => {
    const size = 4 * MiB;
    const model = new Uint8Array(size);
    const live = new LiveDevice(slow(memoryDevice(size), 1, 31));
    await fill(live, model, 6, 30);
    const dst = memoryDevice(size);
    const mirror = new Mirror(live, slow(dst, 1, 32), { mode: 'write-blocking' });
    await mirror.start();
    await mirror.whenReady();
    const w = writer(live, model, 33);
    let maxDirty = 0;
    for (let i = 0; i < 50; i++) {
      await new Promise((r) => setTimeout(r, 2));
      maxDirty = Math.max(maxDirty, mirror.dirtyBytes);
    }
    await w.stop();
    expect(w.writes).toBeGreaterThan(20);
    expect(maxDirty).toBe(0);
    expect(same(await dst.read(0, size), model)).toBe(true); // in sync without a pivot
    await mirror.stop();
  });

  it('stop after ready with consistent: the target is in sync with the source then, and later writes do not reach it', async () => {
    const size = 4 * MiB;
    const model = new Uint8Array(size);
    const src = memoryDevice(size);
    const dst = memoryDevice(size);
    const live = new LiveDevice(slow(src, 2, 41));
    await fill(live, model, 7, 20);
    const w = writer(live, model, 42);
    const mirror = new Mirror(live, slow(dst, 2, 43));
    await mirror.start();
    await mirror.whenReady();
    await new Promise((r) => setTimeout(r, 50));
    await w.stop();
    await mirror.stop({ consistent: true });
    expect(same(await dst.read(0, size), model)).toBe(true);
    await live.write(0, new Uint8Array(8).fill(3));
    expect([...(await dst.read(0, 8))]).toEqual([...model.subarray(0, 8)]);
    await expect(mirror.pivot()).rejects.toMatchObject({ code: 'FailedPrecondition' });
  });

  it('copies only what is allocated when nothing writes (bytes copied ≤ 1.1 × allocated), zero extents as zeroes', async () => {
    const size = 16 * MiB;
    const model = new Uint8Array(size);
    const src = memoryDevice(size);
    const live = new LiveDevice(src);
    await fill(live, model, 8, 60);
    const allocated = (await src.extents(0, size)).reduce((n, e) => n + e.length, 0);
    const dst = memoryDevice(size);
    const mirror = new Mirror(live, dst);
    await mirror.start();
    await mirror.whenReady();
    expect(mirror.bytesCopied).toBeLessThanOrEqual(allocated * 1.1);
    expect(mirror.bytesCopied).toBeGreaterThanOrEqual(allocated);
    await mirror.pivot();
    expect(same(await dst.read(0, size), model)).toBe(true);
  });

  it('copies as bulk I/O: reads into buffers it uses again, asks both devices for background I/O, and sends runs of zeros as writeZeroes; guest I/O is not background; the flushes while clients run are bulk, the one under the hold not', async () => {
    const size = 8 * MiB;
    const src = memoryDevice(size);
    for (let i = 0; i < 6; i++) await src.write(i * MiB, new Uint8Array(MiB).fill(i + 1));
    const dst = memoryDevice(size);
    const seen: string[] = [];
    const buffers = new Set<ArrayBufferLike>(); // of whole-MiB copies
    const source: BlockDevice = {
      ...src,
      // Everything allocated: the last 2 MiB are allocated zeros.
      extents: async (o = 0, l = size - o) => [{ offset: o, length: l, kind: 'data' as const }],
      read: async (o, l, opts) => { seen.push(`source read ${opts?.background === true}`); return src.read(o, l); },
      readInto: async (buf, o, opts) => {
        seen.push(`source readInto ${opts?.background === true}`);
        if (buf.length === MiB) buffers.add(buf.buffer);
        buf.set(await src.read(o, buf.length));
      },
      write: async (o, d, opts) => { seen.push(`source write ${opts?.background === true}`); await src.write(o, d); },
    };
    const target: BlockDevice = {
      ...dst,
      read: (o, l) => dst.read(o, l),
      extents: (o, l) => dst.extents(o, l),
      write: async (o, d, opts) => { seen.push(`target write ${opts?.background === true}`); await dst.write(o, d); },
      writeZeroes: async (o, l) => { seen.push('target zeroes'); await dst.writeZeroes!(o, l); },
      flush: async (opts) => { seen.push(`target flush ${opts?.background === true}`); await dst.flush(); },
    };
    const live = new LiveDevice(source);
    const mirror = new Mirror(live, target, { chunkBytes: MiB });
    await mirror.start();
    await mirror.whenReady();
    await live.write(0, new Uint8Array(4 * KiB).fill(9)); // the guest's
    await mirror.whenReady();
    const count = (what: string) => seen.filter((x) => x === what).length;
    expect(count('source readInto true')).toBeGreaterThanOrEqual(8); // every MiB, and the guest's range again
    expect(count('target write true')).toBeGreaterThanOrEqual(6);
    expect(count('target zeroes')).toBe(2); // the two MiB of zeros, not written as data
    expect(count('source write false')).toBe(1); // the guest's write: not background
    expect(seen.filter((x) => x.endsWith('true') && !x.startsWith('source readInto') && !x.startsWith('target write') && !x.startsWith('target flush'))).toEqual([]);
    expect(count('source read true') + count('source read false')).toBe(0); // readInto where the device has it
    expect(buffers.size).toBeLessThanOrEqual(2); // one per copy in flight, used again (not one per MiB)
    // Before ready (once: in sync from then on, the target is flushed again at the switch-over): a bulk flush.
    expect(count('target flush true')).toBe(1);
    expect(count('target flush false')).toBe(0);
    seen.length = 0;
    await mirror.pivot();
    // The switch-over: a bulk flush while clients still run, then one under the hold, which they wait for.
    expect(seen.filter((x) => x.startsWith('target flush'))).toEqual(['target flush true', 'target flush false']);
    const want = await src.read(0, size);
    expect(same(await dst.read(0, size), want)).toBe(true);
  });

  it('copies scattered small runs many at once (up to 16), whole chunks two at a time, and none twice', async () => {
    for (const [what, runLength, stride] of [['scattered 64 KiB', 64 * KiB, 256 * KiB], ['whole 1 MiB chunks', MiB, 2 * MiB]] as const) {
      const size = 32 * MiB;
      const src = memoryDevice(size);
      let allocated = 0;
      for (let o = 0; o + runLength <= size; o += stride) {
        await src.write(o, new Uint8Array(runLength).fill(5));
        allocated += runLength;
      }
      const dst = memoryDevice(size);
      let now = 0;
      let most = 0;
      const target: BlockDevice = {
        ...dst,
        read: (o, l) => dst.read(o, l),
        extents: (o, l) => dst.extents(o, l),
        write: async (o, d) => {
          most = Math.max(most, ++now);
          await new Promise((r) => setTimeout(r, 2));
          await dst.write(o, d);
          now--;
        },
      };
      const mirror = new Mirror(new LiveDevice(src), target);
      await mirror.start();
      await mirror.whenReady();
      expect(mirror.bytesCopied, what).toBe(allocated);
      if (runLength === MiB) expect(most, what).toBe(2);
      else expect(most, what).toBeGreaterThanOrEqual(8);
      expect(most, what).toBeLessThanOrEqual(16);
      await mirror.pivot();
      expect(same(await dst.read(0, size), await src.read(0, size)), what).toBe(true);
    }
  });

  it('copies from a device without readInto through read(), asking for background I/O', async () => {
    const size = 2 * MiB;
    const src = memoryDevice(size);
    await src.write(0, new Uint8Array(2 * MiB).fill(3));
    const dst = memoryDevice(size);
    const opts: (boolean | undefined)[] = [];
    const source: BlockDevice = { ...src, read: async (o, l, io) => { opts.push(io?.background); return src.read(o, l); } };
    delete (source as { readInto?: unknown }).readInto;
    const mirror = new Mirror(new LiveDevice(source), dst);
    await mirror.start();
    await mirror.whenReady();
    expect(opts.length).toBeGreaterThanOrEqual(2);
    expect(opts.every((b) => b === true)).toBe(true);
    await mirror.pivot();
    expect(same(await dst.read(0, size), new Uint8Array(size).fill(3))).toBe(true);
  });

  it('a target that fails: whenReady rejects with its error, and the source serves on untouched', async () => {
    const size = 2 * MiB;
    const model = new Uint8Array(size);
    const src = memoryDevice(size);
    const live = new LiveDevice(src);
    await fill(live, model, 9, 10);
    const dst = memoryDevice(size);
    dst.failNext('write', Object.assign(new Error('EIO on the target'), { code: 'EIO' }));
    const mirror = new Mirror(live, dst);
    await mirror.start();
    await expect(mirror.whenReady()).rejects.toThrow('EIO on the target');
    await live.write(0, new Uint8Array(3).fill(4));
    model.set([4, 4, 4], 0);
    expect(same(await live.read(0, size), model)).toBe(true);
    await expect(mirror.pivot()).rejects.toMatchObject({ code: 'FailedPrecondition' });
  });
});

/**
 * A device whose calls wait until the test lets them through, one by one: the interleavings the
 * random-latency cases hit only sometimes, made on purpose.
 */
function gated(dev: BlockDevice) {
  const waiting: { op: string; offset: number; go: () => void }[] = [];
  let held: string[] = [];
  let heldAfter: string[] = [];
  const wait = (op: string, offset: number) => new Promise<void>((go) => waiting.push({ op, offset, go }));
  const through = <A extends unknown[], T>(op: string, f: (...a: A) => Promise<T>) => async (...a: A): Promise<T> => {
    if (held.includes(op)) await wait(op, a[0] as number);
    const out = await f(...a);
    // Done, but not answered yet: a read holding what it read, a write that has landed.
    if (heldAfter.includes(op)) await wait(op, a[0] as number);
    return out;
  };
  return {
    device: {
      sizeBytes: dev.sizeBytes,
      blockSize: dev.blockSize,
      read: through('read', (o: number, l: number) => dev.read(o, l)),
      write: through('write', (o: number, d: Uint8Array) => dev.write(o, d)),
      extents: (o?: number, l?: number) => dev.extents(o, l),
      flush: () => dev.flush(),
      close: () => dev.close(),
    } satisfies BlockDevice,
    /** Hold every later call of these ops, before it does anything, until released. */
    hold(...ops: string[]) { held = ops; },
    /** Hold every later call of these ops after it did its work, before it answers, until released. */
    holdAfter(...ops: string[]) { heldAfter = ops; },
    /** Calls waiting now. */
    waiting: () => waiting.map((w) => w.op),
    /** Let the first waiting call of `op` through. */
    release(op: string) {
      const i = waiting.findIndex((w) => w.op === op);
      if (i < 0) throw new Error(`no ${op} is waiting (waiting: ${waiting.map((w) => w.op).join(', ') || 'none'})`);
      waiting.splice(i, 1)[0]!.go();
    },
    releaseAll() { held = []; heldAfter = []; for (const w of waiting.splice(0)) w.go(); },
  };
}

const tick = () => new Promise((r) => setTimeout(r, 10));

/** A 256 KiB source whose first 64 KiB hold ones, a target, both gated, and a mirror of one copier. */
async function onesPair(mode: 'background' | 'write-blocking' = 'background') {
  const src = memoryDevice(256 * KiB);
  await src.write(0, new Uint8Array(64 * KiB).fill(1));
  const dst = memoryDevice(256 * KiB);
  const gsrc = gated(src);
  const gdst = gated(dst);
  const live = new LiveDevice(gsrc.device);
  return { src, dst, gsrc, gdst, live, mirror: new Mirror(live, gdst.device, { mode, concurrency: 1, maxCopies: 1 }) };
}

/** What the target holds at the start after the ten-byte write of twos over the ones. */
const TWOS_OVER_ONES = [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1];

describe('Mirror, interleavings made on purpose', () => {
  const heldCopies = [
    { what: 'a write that lands after the copier read its range (its write to the target held) is copied again', hold: 'target write' },
    { what: 'a write that lands between the copier\'s read and its write is copied again (the bit was cleared before the read, not after)', hold: 'source read' },
  ] as const;
  for (const c of heldCopies) {
    it(`background: ${c.what}`, async () => {
      const { dst, gsrc, gdst, live, mirror } = await onesPair();
      // The copier stops with the old data in hand: before writing it, or right after reading it.
      if (c.hold === 'target write') gdst.hold('write');
      else gsrc.holdAfter('read');
      await mirror.start();
      await tick();
      expect([...gsrc.waiting(), ...gdst.waiting()]).toEqual([c.hold === 'target write' ? 'write' : 'read']);
      await live.write(0, new Uint8Array(10).fill(2)); // lands and is marked now
      gsrc.releaseAll();
      gdst.releaseAll();
      await mirror.whenReady();
      await mirror.pivot();
      expect([...(await dst.read(0, 12))]).toEqual(TWOS_OVER_ONES);
    });
  }

  it('background: a write is marked once it has landed, not before (a copier in between would read the old data and clear the mark)', async () => {
    const { dst, gsrc, live, mirror } = await onesPair();
    await mirror.start();
    await mirror.whenReady();
    gsrc.hold('write');
    const w = live.write(0, new Uint8Array(10).fill(2)); // sent, not landed
    await tick();
    expect(gsrc.waiting()).toEqual(['write']);
    expect(mirror.dirtyBytes).toBe(0); // nothing to copy yet: the data is not there
    gsrc.releaseAll();
    await w;
    await mirror.pivot();
    expect([...(await dst.read(0, 12))]).toEqual(TWOS_OVER_ONES);
  });

  it('write-blocking: a guest write to a range the copier is copying waits for it, then reaches both sides', async () => {
    const { src, dst, gdst, live, mirror } = await onesPair('write-blocking');
    gdst.hold('write');
    await mirror.start();
    await tick();
    expect(gdst.waiting()).toEqual(['write']); // the copier holds granule 0, its old data not yet written
    let acked = false;
    const w = live.write(0, new Uint8Array(10).fill(2)).then(() => { acked = true; });
    await tick();
    expect(acked).toBe(false);
    expect([...(await src.read(0, 1))]).toEqual([1]); // not even the source: it waits for the range lock
    gdst.releaseAll();
    await w;
    await mirror.whenReady();
    expect([...(await dst.read(0, 12))]).toEqual(TWOS_OVER_ONES); // in sync without a pivot
    expect(mirror.dirtyBytes).toBe(0);
    await mirror.stop();
  });

  it('write-blocking: a guest write to a range still to be copied goes to the source only (the copier copies it); once copied, to both sides', async () => {
    const src = memoryDevice(256 * KiB);
    await src.write(0, new Uint8Array(64 * KiB).fill(1));
    await src.write(128 * KiB, new Uint8Array(64 * KiB).fill(1));
    const dst = memoryDevice(256 * KiB);
    const gdst = gated(dst);
    const live = new LiveDevice(src);
    const mirror = new Mirror(live, gdst.device, { mode: 'write-blocking', concurrency: 1, maxCopies: 1 });
    gdst.hold('write');
    await mirror.start();
    await tick();
    expect(gdst.waiting()).toEqual(['write']); // the copier, on granule 0
    // Granule 2 is still to be copied: acknowledged with the target's writes held, and not sent there.
    await live.write(128 * KiB, new Uint8Array(10).fill(2));
    expect(gdst.waiting()).toEqual(['write']);
    gdst.releaseAll();
    await mirror.whenReady();
    expect([...(await dst.read(128 * KiB, 12))]).toEqual(TWOS_OVER_ONES); // copied by the copier
    // Copied now: a write reaches both sides before it is acknowledged, and nothing becomes dirty.
    gdst.hold('write');
    let acked = false;
    const w = live.write(128 * KiB, new Uint8Array(4).fill(3)).then(() => { acked = true; });
    await tick();
    expect(gdst.waiting()).toEqual(['write']);
    expect(acked).toBe(false);
    gdst.releaseAll();
    await w;
    expect([...(await dst.read(128 * KiB, 5))]).toEqual([3, 3, 3, 3, 2]);
    expect(mirror.dirtyBytes).toBe(0);
    await mirror.stop();
  });

  it('the target defers its metadata while the mirror copies, and writes it through again before the switch-over', async () => {
    const src = memoryDevice(256 * KiB);
    await src.write(0, new Uint8Array(64 * KiB).fill(1));
    const dst = memoryDevice(256 * KiB);
    const calls: string[] = [];
    const target: BlockDevice = {
      ...dst,
      read: (o, l) => dst.read(o, l),
      write: (o, d) => dst.write(o, d),
      extents: (o, l) => dst.extents(o, l),
      deferMetadata: async (on) => void calls.push(`defer ${on}`),
      flush: async () => { calls.push('flush'); await dst.flush(); },
    };
    const live = new LiveDevice(src);
    const mirror = new Mirror(live, target);
    await mirror.start();
    expect(calls).toEqual(['defer true']);
    await mirror.whenReady();
    calls.length = 0;
    await mirror.pivot(async () => void calls.push('commit'));
    // The last flush comes after it writes through again, and the commit after that.
    expect(calls.slice(calls.lastIndexOf('defer false'))).toEqual(['defer false', 'flush', 'commit']);
  });

  it('pivot holds a request that arrives during the last pass and sends it to the target', async () => {
    const size = 256 * KiB;
    const src = memoryDevice(size);
    const live = new LiveDevice(src);
    const dst = memoryDevice(size);
    const mirror = new Mirror(live, dst);
    await mirror.start();
    await mirror.whenReady();
    let during!: Promise<void>;
    await mirror.pivot(async () => {
      during = live.write(0, new Uint8Array(4).fill(9)); // a client's write while the switch is being recorded
      await tick();
    });
    await during;
    expect([...(await dst.read(0, 4))]).toEqual([9, 9, 9, 9]);
    expect([...(await src.read(0, 4))]).toEqual([0, 0, 0, 0]); // never reached the old side
  });
});

describe('Fill (an instant clone\'s target while it fills)', () => {
  it('its background fill is bulk I/O on both devices; a client\'s write to a pending range fills it first with ordinary I/O', async () => {
    const size = 4 * MiB;
    const src = memoryDevice(size);
    await src.write(0, new Uint8Array(size).fill(4));
    const dst = memoryDevice(size);
    const seen: string[] = [];
    const source: BlockDevice = { ...src, read: async (o, l, io) => { seen.push(`source read ${io?.background === true}`); return src.read(o, l); } };
    const target: BlockDevice = {
      ...dst,
      read: (o, l) => dst.read(o, l),
      extents: (o, l) => dst.extents(o, l),
      write: async (o, d, io) => { seen.push(`target write ${io?.background === true}`); await dst.write(o, d); },
    };
    const fill = new Fill(source, target, { granularity: 64 * KiB, pending: [[0, size]] }, async () => undefined);
    const view = fill.view();
    // A client writes into a pending range: its granule is filled from the source first, then written; not bulk.
    await view.write(3 * MiB + 100, new Uint8Array(10).fill(8));
    expect(seen).toEqual(['source read false', 'target write false', 'target write false']);
    seen.length = 0;
    await fill.fillRange({ offset: 0, length: MiB });
    expect(seen).toEqual(['source read true', 'target write true']);
    const got = await view.read(3 * MiB, 128);
    expect([...got.subarray(100, 110)]).toEqual(new Array(10).fill(8));
    expect(got[99]).toBe(4);
    await view.close();
    await fill.release();
  });
});
