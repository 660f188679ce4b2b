/** The copier skips 4 KiB blocks of zeros (qemu-img's -S 4k): the fast scan must find exactly the blocks a plain scan finds. */
import { expect, it } from 'vitest';
import { nonZeroRuns } from '../../core/index.js';
import { isAllZero } from '../../core/copy/zero-scan.js';
function naive(d: Uint8Array): [number, number][] {
  const r: [number, number][] = []; let s = -1;
  for (let o = 0; o < d.length; o += 4096) { const e = Math.min(o + 4096, d.length); const z = d.subarray(o, e).every((x) => x === 0);
    if (!z && s < 0) s = o; if (z && s >= 0) { r.push([s, o]); s = -1; } }
  if (s >= 0) r.push([s, d.length]); return r;
}
it('nonZeroRuns finds the same non-zero 4 KiB runs as a byte-by-byte scan, for random sparse buffers', () => {
  let seed = 7; const rnd = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  for (let t = 0; t < 80; t++) {
    const len = 1 + Math.floor(rnd() * (2 << 20));
    const d = new Uint8Array(len);
    const k = Math.floor(rnd() * 20);
    for (let i = 0; i < k; i++) { const at = Math.floor(rnd() * len); const n = Math.floor(rnd() * 20000); d.fill(1 + (i % 200), at, Math.min(len, at + n)); }
    if (rnd() < 0.3) d[Math.floor(rnd() * len)] = 9;
    expect(nonZeroRuns(d)).toEqual(naive(d));
  }
});

it('isAllZero: true only when every byte is zero, at any length and offset within its buffer (views included)', () => {
  for (const len of [0, 1, 15, 16, 17, 4096, (2 << 20) + 5, 5 << 20]) {
    const backing = new Uint8Array(len + 64);
    const d = backing.subarray(32, 32 + len);
    expect(isAllZero(d)).toBe(true);
    for (const at of [0, len >> 1, len - 1].filter((x) => x >= 0 && x < len)) {
      d[at] = 1;
      expect(isAllZero(d)).toBe(false);
      d[at] = 0;
    }
    backing[31] = 1; // outside the view
    backing[32 + len] = 1;
    expect(isAllZero(d)).toBe(true);
    backing[31] = 0;
    backing[32 + len] = 0;
  }
});
