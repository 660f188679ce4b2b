import { InvalidArgument } from '../model/errors.js';

const UNITS: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

/**
 * Parse a size like qemu-img does: a number with an optional binary suffix (k, M, G, T, P, E;
 * also KiB, MiB, … and kB-style spellings are taken as binary). A bare number is bytes.
 */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)(?:i?b)?\s*$/i.exec(String(text));
  if (!m) throw new InvalidArgument(`invalid ${what} "${text}": expected a number of bytes with an optional suffix k, M, G, T`);
  const value = Number(m[1]) * UNITS[m[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(value)) throw new InvalidArgument(`invalid ${what} "${text}": not a whole number of bytes within range`);
  return value;
}

/** 1073741824 → "1 GiB"; exact where possible. */
export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${bytes} B` : `${Number.isInteger(v) ? v : v.toFixed(2)} ${units[i]}`;
}
