/**
 * The pool's `data.dirty` read from its layers, where the chain is not a straight line: a revert
 * between the two points, a snapshot deleted between them (its layer merged away), a volume
 * open in this process (its writes not yet anywhere else), and a linked clone's own snapshots.
 * Each answer must cover every byte that differs between the two points — checked against the
 * points' data read back — and leave out ranges written on neither side.
 */
import { afterAll, describe, expect, it } from 'vitest';
import type { Broker } from '../../core/index.js';
import { MiB, restartFixture } from './pool-helpers.js';

const { open, cleanup } = restartFixture('offload-pool-changes-');
afterAll(cleanup);

const SIZE = 8 * MiB;

async function write(b: Broker, ref: string, at: [number, number, number][]): Promise<void> {
  const d = await b.volumes.open(ref, 'rw');
  try {
    for (const [off, len, v] of at) await d.write(off, Buffer.alloc(len, v));
    await d.flush();
  } finally {
    await d.close();
  }
}

async function read(b: Broker, ref: string): Promise<Buffer> {
  const d = await b.volumes.open(ref, 'r');
  try {
    return Buffer.from(await d.read(0, SIZE));
  } finally {
    await d.close();
  }
}

/** Every byte where a and b differ lies in one of the extents. */
function covers(extents: { offset: number; length: number }[], a: Buffer, b: Buffer): boolean {
  for (let i = 0; i < SIZE; i++) {
    if (a[i] === b[i]) continue;
    if (!extents.some((e) => e.offset <= i && i < e.offset + e.length)) return false;
  }
  return true;
}

const within = (extents: { offset: number; length: number }[], lo: number, hi: number) => extents.every((e) => e.offset >= lo && e.offset + e.length <= hi);

describe('pool changes across reverts, deleted snapshots, open volumes and clones', () => {
  let b: Broker;
  it('a revert between the points: both sides\' layers count', async () => {
    b = await open();
    await b.volumes.create('local/r', { sizeBytes: SIZE });
    await write(b, 'local/r', [[0, MiB, 1]]);
    await b.snapshots.create('local/r@s0');
    await write(b, 'local/r', [[2 * MiB, MiB, 2]]);
    await b.snapshots.create('local/r@s1');
    const atS1 = await read(b, 'local/r');
    await b.snapshots.revert('local/r@s0'); // drops the 2 MiB write
    await write(b, 'local/r', [[5 * MiB, 64 * 1024, 3]]);
    const now = await read(b, 'local/r');
    const c = await b.volumes.changes('local/r', { since: 's1' });
    expect(covers(c.extents, atS1, now)).toBe(true);
    expect(within(c.extents, 2 * MiB, 5 * MiB + 64 * 1024)).toBe(true); // nothing from the first MiB, which both share
  });

  it('a snapshot deleted between the points (its layer merged) and the volume open here meanwhile', async () => {
    await b.volumes.create('local/d', { sizeBytes: SIZE });
    await write(b, 'local/d', [[0, 2 * MiB, 1]]);
    await b.snapshots.create('local/d@s1');
    const atS1 = await read(b, 'local/d');
    await write(b, 'local/d', [[MiB, 4096, 2]]);
    await b.snapshots.create('local/d@mid');
    await write(b, 'local/d', [[3 * MiB, 4096, 3]]);
    await b.snapshots.delete('local/d@mid');
    const dev = await b.volumes.open('local/d', 'rw'); // open in this process: its writes are there only
    try {
      await dev.write(6 * MiB, Buffer.alloc(4096, 4));
      const c = await b.volumes.changes('local/d', { since: 's1' });
      const now = Buffer.from(await dev.read(0, SIZE));
      expect(covers(c.extents, atS1, now)).toBe(true);
      expect(c.extents.reduce((n, e) => n + e.length, 0)).toBeLessThanOrEqual(3 * 64 * 1024);
    } finally {
      await dev.close();
    }
  });

  it('a linked clone: its changes since its own snapshot, and none from its parent', async () => {
    await b.volumes.create('local/p', { sizeBytes: SIZE });
    await write(b, 'local/p', [[0, 4 * MiB, 1]]);
    await b.snapshots.create('local/p@gold');
    await b.clone('local/p@gold', 'local/kid', { mode: 'linked' });
    await b.snapshots.create('local/kid@k1');
    const atK1 = await read(b, 'local/kid');
    await write(b, 'local/kid', [[7 * MiB, 4096, 9]]);
    await write(b, 'local/p', [[MiB, MiB, 5]]); // the parent goes on: not the clone's change
    const c = await b.volumes.changes('local/kid', { since: 'k1' });
    expect(c.extents).toEqual([{ offset: 7 * MiB, length: 64 * 1024 }]);
    expect(covers(c.extents, atK1, await read(b, 'local/kid'))).toBe(true);
    await b.close();
  });
});
