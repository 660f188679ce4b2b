/**
 * Finding the 4 KiB blocks of a buffer that are not all zero (qemu-img's `-S 4k` granularity):
 * the copier leaves the zero ones out of a fresh target, and a raw file without SEEK_DATA reports
 * them as holes. This runs over every byte, so it avoids per-block views and calls where it can.
 */
const BLOCK = 4096;

/** [from, to) runs of `data` made of BLOCK-sized blocks that are not all zero. */
export function nonZeroRuns(data: Uint8Array): [number, number][] {
  const runs: [number, number][] = [];
  const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const len = buf.length;
  let off = 0;
  while (off < len) {
    let end = off;
    while (end < len && !isZeroRange(buf, end, Math.min(end + BLOCK, len))) end += BLOCK;
    if (end > off) runs.push([off, Math.min(end, len)]);
    if (end >= len) break;
    off = endOfZeros(buf, end + BLOCK);
  }
  return runs;
}

/** Whether every byte of `data` is zero (a native memcmp, after a look at its first bytes). */
export function isAllZero(data: Uint8Array): boolean {
  return isZeroRange(Buffer.from(data.buffer, data.byteOffset, data.byteLength), 0, data.byteLength);
}

const ZERO_CHUNK = Buffer.alloc(2 << 20);

/**
 * Whether buf[from, to) is all zeros: a native memcmp against zeros (no views created). Data
 * usually shows a non-zero byte among its first 16, which settles it without the call.
 */
function isZeroRange(buf: Buffer, from: number, to: number): boolean {
  for (let i = from; i < Math.min(to, from + 16); i++) if (buf[i] !== 0) return false;
  for (let p = from; p < to; p += ZERO_CHUNK.length) {
    const n = Math.min(ZERO_CHUNK.length, to - p);
    if (ZERO_CHUNK.compare(buf, p, p + n, 0, n) !== 0) return false;
  }
  return true;
}

/**
 * The start of the first non-zero BLOCK at or after `p` (a block boundary), or the end.
 * Galloping: spans double while they are zero and halve when not, so a long hole costs a few
 * large memcmps rather than one call per block.
 */
function endOfZeros(buf: Buffer, p: number): number {
  let step = BLOCK;
  while (p < buf.length) {
    const n = Math.min(step, buf.length - p);
    if (isZeroRange(buf, p, p + n)) {
      p += n;
      step = Math.min(step * 2, ZERO_CHUNK.length);
    } else if (n <= BLOCK) {
      return p;
    } else {
      step = Math.max(BLOCK, Math.floor(n / 2 / BLOCK) * BLOCK);
    }
  }
  return buf.length;
}
