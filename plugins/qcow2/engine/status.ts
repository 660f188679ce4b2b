import type { BlockStatus } from './types.js';

/** Merge adjacent ranges the way `qemu-img map` does: same flags, depth, file, contiguous offsets. */
export function mergeStatus(list: BlockStatus[]): BlockStatus[] {
  const out: BlockStatus[] = [];
  for (const s of list) {
    const prev = out[out.length - 1];
    if (prev && prev.start + prev.length === s.start && prev.depth === s.depth && prev.present === s.present &&
      prev.zero === s.zero && prev.data === s.data && prev.compressed === s.compressed && prev.filename === s.filename &&
      ((prev.offset === undefined && s.offset === undefined) ||
        (prev.offset !== undefined && s.offset !== undefined && prev.offset + prev.length === s.offset))) {
      prev.length += s.length;
    } else {
      out.push({ ...s });
    }
  }
  return out;
}
