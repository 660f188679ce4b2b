/** bench/incremental.ts's shared pieces: sizes, a seeded random source, the volume's layout, the clock. */
import { readFileSync } from 'node:fs';

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;
export const BLOCK = 4096;
/** The pool's cluster size and the default bitmap granularity (QEMU's and ours): what one small write dirties. */
export const GRANULE = 64 * 1024;

export function parseSize(s: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$/i.exec(s.trim());
  if (!m) throw new Error(`not a size: ${s} (e.g. 4G, 1G, 10M)`);
  const unit = { '': 1, k: 1024, m: MiB, g: GiB, t: 1024 * GiB }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  return Math.round(Number(m[1]) * unit);
}

export function fmtBytes(n: number): string {
  if (n >= GiB) return `${(n / GiB).toFixed(n % GiB ? 2 : 0)} GiB`;
  if (n >= MiB) return `${(n / MiB).toFixed(n % MiB ? 2 : 0)} MiB`;
  return `${(n / 1024).toFixed(n % 1024 ? 1 : 0)} KiB`;
}

/** mulberry32 (the appliance kit's): the same offsets for every way and every run with the same seed. */
export { seededRandom as rng } from '../../plugins/appliance-kit/index.js';

/**
 * The allocated data: `allocated / 1 MiB` chunks of 1 MiB, evenly spread (at 4 GiB with 1 GiB
 * allocated: the first MiB of every 4 MiB). Chunk i holds bytes of value (i % 250) + 1.
 */
export function layout(size: number, allocated: number): { chunks: number; stride: number } {
  const chunks = Math.floor(allocated / MiB);
  const stride = Math.floor(size / chunks / GRANULE) * GRANULE;
  if (chunks < 1 || stride < MiB) throw new Error(`--allocated must be 1 MiB to --size (got ${allocated} of ${size})`);
  return { chunks, stride };
}

export const ms = (t0: bigint) => Number(process.hrtime.bigint() - t0) / 1e6;

/**
 * Bytes this process (all its threads) read and wrote through system calls — read/pread/write/
 * pwrite and copy_file_range alike, page cache or not (Linux /proc/self/io rchar/wchar).
 */
export function procIo(): { rchar: number; wchar: number } {
  let text = '';
  try {
    text = readFileSync('/proc/self/io', 'utf8');
  } catch {
    // not Linux: the figures say NaN
  }
  const get = (k: string) => Number(new RegExp(`^${k}: (\\d+)$`, 'm').exec(text)?.[1] ?? NaN);
  return { rchar: get('rchar'), wchar: get('wchar') };
}
