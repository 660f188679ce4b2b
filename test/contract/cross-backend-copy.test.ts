/**
 * Host copies between real backends: the local qcow2 pool, the FlashArray mock and the ONTAP
 * mock in one broker, each pair in both directions, with `broker.copy` into an existing volume
 * (full of other data first) and `broker.clone` across backends (which creates the target).
 * The source holds data ranges (aligned, unaligned, across a copy chunk, at the very end), ranges
 * zeroed on purpose and holes; every byte of the target must equal the source, and whatever the
 * source has not allocated must read as zeros in the target.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { COPY_CHUNK, type Broker, type Extent } from '../../core/index.js';
import { patternBytes as bytes, startAllBackends, withDevice, type AllBackends } from '../support/all-backends.js';

const MiB = 1024 * 1024;
const SIZE = 12 * MiB;
const BACKENDS = ['local', 'san1', 'nas1'] as const;


/** What the source gets: [offset, length, 'data' | 'zero']. Everything else stays a hole. */
const LAYOUT: readonly [number, number, 'data' | 'zero'][] = [
  [0, 64 * 1024, 'data'],
  [MiB + 512, 100 * 1024 + 512, 'data'], // sector-aligned but not block-aligned
  [2 * MiB, 256 * 1024, 'zero'],
  [2 * MiB + 256 * 1024, 64 * 1024, 'data'], // data right after zeros
  [COPY_CHUNK - 3000, 8192, 'data'], // across the host copy's chunk boundary
  [6 * MiB, MiB, 'zero'],
  [9 * MiB + 4096, 3 * 512, 'data'],
  [SIZE - 8192, 8192, 'data'], // the last bytes
];

describe('host copies between the pool, the SAN mock and the NAS mock, checked byte for byte', () => {
  let all: AllBackends;
  let broker: Broker;

  beforeAll(async () => {
    all = await startAllBackends({ prefix: 'offload-cross-' });
    broker = all.broker;
  });

  afterAll(async () => {
    await all?.close();
  });

  /** A source volume laid out as LAYOUT says, written through the broker's data path. */
  async function makeSource(ref: string, seed: number): Promise<void> {
    await broker.volumes.create(ref, { sizeBytes: SIZE });
    await withDevice(broker, ref, 'rw', async (dev) => {
      // Zero ranges first hold data, so that zeroing them is a change the copy must carry.
      for (const [off, len] of LAYOUT) await dev.write(off, bytes(seed, off, len));
      for (const [off, len, kind] of LAYOUT) {
        if (kind !== 'zero') continue;
        if (dev.writeZeroes) await dev.writeZeroes(off, len);
        else await dev.write(off, new Uint8Array(len));
      }
      await dev.flush();
    });
  }

  /** An existing target full of other bytes, so that a range the copy skips would show. */
  async function makeFilledTarget(ref: string): Promise<void> {
    await broker.volumes.create(ref, { sizeBytes: SIZE });
    await withDevice(broker, ref, 'rw', async (dev) => {
      for (let off = 0; off < SIZE; off += 4 * MiB) await dev.write(off, new Uint8Array(4 * MiB).fill(0xee));
      await dev.flush();
    });
  }

  async function expectSameBytes(source: string, target: string, seed: number): Promise<void> {
    const [src, srcExtents] = await withDevice(broker, source, 'r', async (d) => [Buffer.from(await d.read(0, SIZE)), await d.extents()] as const);
    const dst = await withDevice(broker, target, 'r', async (d) => {
      expect(d.sizeBytes).toBeGreaterThanOrEqual(SIZE);
      return Buffer.from(await d.read(0, SIZE));
    });
    // The source itself is what LAYOUT says (else comparing with it would prove little).
    for (const [off, len, kind] of LAYOUT) {
      const want = kind === 'data' ? Buffer.from(bytes(seed, off, len)) : Buffer.alloc(len);
      expect(src.subarray(off, off + len).equals(want), `${source} ${kind} at ${off}`).toBe(true);
    }
    const firstDiff = src.findIndex((b, i) => b !== dst[i]);
    expect(firstDiff, `${target} differs from ${source} first at byte ${firstDiff}`).toBe(-1);
    for (const hole of holes(srcExtents, SIZE)) {
      expect(dst.subarray(hole.offset, hole.offset + hole.length).every((b) => b === 0), `${target} hole at ${hole.offset}+${hole.length}`).toBe(true);
    }
  }

  let seed = 0;
  for (const from of BACKENDS) {
    for (const to of BACKENDS) {
      if (from === to) continue;
      it(`copy ${from} → ${to} into an existing volume`, async () => {
        const s = ++seed;
        const source = `${from}/cp-src-${from}-${to}`;
        const target = `${to}/cp-dst-${from}-${to}`;
        await makeSource(source, s);
        await makeFilledTarget(target);
        const info = await (await broker.copy(source, target)).wait();
        expect(info.error).toBeUndefined();
        expect(info.status).toBe('concluded');
        expect(info.executor).toBe('host');
        // Sparse: only what the source allocated crossed the host as data.
        expect(info.progress.current).toBeLessThan(SIZE / 2);
        await expectSameBytes(source, target, s);
      });

      it(`clone ${from} → ${to} across backends creates the target`, async () => {
        const s = ++seed;
        const source = `${from}/cl-src-${from}-${to}`;
        const target = `${to}/cl-dst-${from}-${to}`;
        await makeSource(source, s);
        const made = await broker.clone(source, target, { mode: 'full' });
        expect(made).toMatchObject({ backend: to, name: `cl-dst-${from}-${to}` });
        expect(made.sizeBytes).toBeGreaterThanOrEqual(SIZE);
        await expectSameBytes(source, target, s);
      });
    }
  }
});

/** The ranges of [0, size) that no extent covers. */
function holes(extents: Extent[], size: number): Extent[] {
  const out: Extent[] = [];
  let pos = 0;
  for (const e of [...extents].sort((a, b) => a.offset - b.offset)) {
    if (e.offset > pos) out.push({ offset: pos, length: e.offset - pos, kind: 'zero' });
    pos = Math.max(pos, e.offset + e.length);
  }
  if (pos < size) out.push({ offset: pos, length: size - pos, kind: 'zero' });
  return out;
}
