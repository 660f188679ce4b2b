/**
 * Issue 17's benchmark (changed-block tracking), two parts:
 *
 *  1. bitmap  — the write-path cost of one enabled persistent dirty bitmap vs none: 4 KiB random
 *     writes through our qcow2 engine in this process, and the same writes from `qemu-io` (one
 *     process per batch) on QEMU's files, for comparison. Goal: bitmap / none ≤ 1.1.
 *     (bench/incremental/bitmap-cost.ts says how.)
 *  2. copy    — incremental copy vs full copy: a 4 GiB volume with 1 GiB allocated on the pool
 *     (then the same on the FlashArray mock, in this process), snapshot s1, 1 % of the allocated
 *     data changed (whole 64 KiB granules at random offsets inside it), snapshot s2; then (a)
 *     `broker.copy(vol@s2, dst)` into a fresh pool volume and (b) `broker.copy(vol@s2, dst2,
 *     { since: 's1' })` into a pool volume that holds s1's data (a full copy of vol@s1, untimed):
 *     time and bytes through the host. Goal: incremental bytes ≤ 1.05 × the changed bytes.
 *     (bench/incremental/copy.ts says how.)
 * The tables come at the end, after the rounds' progress lines.
 *
 *   node --import tsx bench/incremental.ts                 (both parts: ~1.5 min on this 2-vCPU VM)
 *   node --import tsx bench/incremental.ts --part bitmap   (or --part copy; --no-san: the pool alone)
 * Options: --size (4G), --allocated (1G), --changed (percent of the allocated data, 1),
 * --writes (4 KiB writes per batch in part 1, 2000), --slice (writes per turn in part 1, 100),
 * --rounds (or OFFLOAD_BENCH_ROUNDS; default 7 for part 1, 3 for part 2), --no-qemu (part 1
 * without qemu-io), --no-san (part 2 without the FlashArray mock), --json (the figures as JSON on
 * stdout, progress on stderr). OFFLOAD_BENCH_DIR: where the temporary folder goes (default $TMPDIR).
 * Needs qemu-utils (qemu-io, qemu-img) and coreutils' stdbuf for part 1's comparison and checks;
 * runs from the sources (no build needed).
 */
import { rmSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { workDir } from './harness.js';
import { bitmapCost, reportBitmapCost, type BitmapCostResult } from './incremental/bitmap-cost.js';
import { parseSize } from './incremental/common.js';
import { incrementalCopy, reportIncrementalCopy, type CopyBenchResult } from './incremental/copy.js';

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      part: { type: 'string', default: 'all' },
      size: { type: 'string', default: '4G' },
      allocated: { type: 'string', default: '1G' },
      changed: { type: 'string', default: '1' },
      writes: { type: 'string', default: '2000' },
      slice: { type: 'string', default: '100' },
      rounds: { type: 'string', default: process.env.OFFLOAD_BENCH_ROUNDS },
      'no-qemu': { type: 'boolean', default: false },
      'no-san': { type: 'boolean', default: false },
      json: { type: 'boolean', default: false },
    },
    strict: true,
  });
  const part = values.part;
  if (part !== 'all' && part !== 'bitmap' && part !== 'copy') throw new Error(`--part: all, bitmap or copy, got ${part}`);
  const size = parseSize(values.size);
  const allocated = parseSize(values.allocated);
  const out = values.json ? process.stderr : process.stdout;
  const say = (line: string) => out.write(`${line}\n`);
  const json: { bitmap?: BitmapCostResult; copy?: CopyBenchResult } = {};

  const dir = workDir('offload-bench-incremental-');
  try {
    say(`incremental bench (issue 17) in ${dir}`);
    if (part === 'all' || part === 'bitmap') {
      const r = await bitmapCost(dir, {
        size, allocated, writes: Number(values.writes), slice: Number(values.slice), rounds: Number(values.rounds ?? 7), qemu: !values['no-qemu'],
      }, say);
      json.bitmap = r;
    }
    if (part === 'all' || part === 'copy') {
      json.copy = await incrementalCopy(dir, {
        size, allocated, changedPct: Number(values.changed), rounds: Number(values.rounds ?? 3), san: !values['no-san'],
      }, say);
    }
    // The tables at the end, together.
    if (json.bitmap) reportBitmapCost(json.bitmap, say);
    if (json.copy) reportIncrementalCopy(json.copy, say);
    if (values.json) process.stdout.write(`${JSON.stringify(json, null, 2)}\n`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
