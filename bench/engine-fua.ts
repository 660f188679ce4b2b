/**
 * The engine alone, no NBD: what one durable 4 KiB guest write costs, as bench/nbd.ts (c) makes
 * the export do it, one after another. A 1 GiB qcow2 with 512 MiB written (1 MiB every other
 * MiB, as bench/nbd.ts), opened as the pool opens its volumes (metadata written through):
 *   alloc     4 KiB into a cluster nothing maps yet (refcount, the cluster with its zero edges,
 *             the L2 entry), then durable;
 *   in place  4 KiB into a cluster the image owns, then durable;
 * each as `write` then `flush` (what the export did for FUA before) and as `write(…, { fua })`
 * where the image has it; and a bare Node loop of pwrite + fdatasync on a plain file for scale.
 * Mean ms per write over N (OFFLOAD_BENCH_N, default 1000) after 200 untimed, median of 5 passes;
 * each pass runs every row once, in turn, so that the load of other processes falls on all alike.
 *
 *   node --import tsx bench/engine-fua.ts
 *   OFFLOAD_BENCH_DIR=/dev/shm node --import tsx bench/engine-fua.ts   (tmpfs: fdatasync costs
 *     nothing there, what is left is the engine and its thread-pool round trips)
 */
import { open } from 'node:fs/promises';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { createImage, openImage, type Image } from '../plugins/qcow2/engine/index.js';
import { median, workDir } from './harness.js';

const MiB = 1024 * 1024;
const N = Number(process.env.OFFLOAD_BENCH_N ?? 1000);
const WARM = 200;
const dir = workDir('offload-bench-fua-');

type Step = (img: Image, off: number, data: Uint8Array) => Promise<void>;
const writeThenFlush: Step = async (img, off, data) => {
  await img.write(off, data);
  await img.flush();
};
const fua: Step = async (img, off, data) => {
  await img.write(off, data, { fua: true });
};

/** N + WARM offsets: in clusters not allocated yet (`alloc`), or in the written MiBs (`in place`). */
function offsets(kind: 'alloc' | 'inplace', pass: number): number[] {
  // Distinct clusters for the allocating writes: every 64 KiB cluster of the odd MiBs, from a
  // different start each pass (passes use fresh images anyway).
  const out: number[] = [];
  for (let i = 0; out.length < N + WARM; i++) {
    const mib = (2 * (i % 512) + (kind === 'alloc' ? 1 : 0)) * MiB;
    const cl = (Math.floor(i / 512) + pass) % 16;
    out.push(mib + cl * 65536 + (i % 16) * 4096);
  }
  return out;
}

async function freshImage(name: string): Promise<Image> {
  const path = join(dir, name);
  await createImage(path, { size: 1024 * MiB, overwrite: true });
  const img = await openImage(path, { readOnly: false });
  const buf = new Uint8Array(MiB).fill(7);
  for (let i = 0; i < 512; i++) await img.write(2 * i * MiB, buf);
  await img.close();
  return openImage(path, { readOnly: false });
}

/** One pass of a row: mean ms per write. */
async function measure(kind: 'alloc' | 'inplace', step: Step, pass: number): Promise<number> {
  const data = new Uint8Array(4096).fill(0x5a);
  const img = await freshImage(`img-${kind}.qcow2`);
  const offs = offsets(kind, pass);
  for (let i = 0; i < WARM; i++) await step(img, offs[i]!, data);
  const t0 = process.hrtime.bigint();
  for (let i = WARM; i < offs.length; i++) await step(img, offs[i]!, data);
  const ms = Number(process.hrtime.bigint() - t0) / 1e6 / N;
  await img.close();
  return ms;
}

/** One pass of a bare Node loop, 4 KiB pwrite + fdatasync into a preallocated file. */
async function bare(): Promise<number> {
  const fh = await open(join(dir, 'bare'), 'w+');
  await fh.write(new Uint8Array(MiB), 0, MiB, 0);
  const data = new Uint8Array(4096).fill(1);
  for (let i = 0; i < WARM; i++) { await fh.write(data, 0, 4096, (i % 256) * 4096); await fh.datasync(); }
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < N; i++) { await fh.write(data, 0, 4096, (i % 256) * 4096); await fh.datasync(); }
  const ms = Number(process.hrtime.bigint() - t0) / 1e6 / N;
  await fh.close();
  return ms;
}

try {
  const rows: [string, (pass: number) => Promise<number>][] = [
    ['bare pwrite + fdatasync', bare],
    ['alloc: write, flush', (pass) => measure('alloc', writeThenFlush, pass)],
    ['alloc: write fua', (pass) => measure('alloc', fua, pass)],
    ['in place: write, flush', (pass) => measure('inplace', writeThenFlush, pass)],
    ['in place: write fua', (pass) => measure('inplace', fua, pass)],
  ];
  const got = rows.map((): number[] => []);
  for (let pass = 0; pass < 5; pass++) for (let r = 0; r < rows.length; r++) got[r]!.push(await rows[r]![1](pass));
  process.stdout.write(`engine, durable 4 KiB writes (mean ms per write over ${N}, median of 5)\n`);
  rows.forEach(([what], r) => process.stdout.write(`${what.padEnd(28)} ${median(got[r]!).toFixed(3)}   (${got[r]!.map((x) => x.toFixed(3)).join(' ')})\n`));
} finally {
  rmSync(dir, { recursive: true, force: true });
}
