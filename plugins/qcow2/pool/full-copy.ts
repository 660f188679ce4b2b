/**
 * A full clone's data copy: only the ranges the source chain holds data for are read and
 * written (zero and unallocated ranges already read as zeros in a fresh target), so the copy is
 * as sparse as the source, in chunks of at most 4 MiB so memory stays bounded.
 */
import type { Image } from '../index.js';

const CHUNK = 4 << 20;

export async function copyAllocated(read: (off: number, len: number) => Promise<Uint8Array>,
  status: () => Promise<{ start: number; length: number; data: boolean }[]>, target: Image): Promise<number> {
  let moved = 0;
  for (const s of await status()) {
    if (!s.data) continue;
    for (let off = s.start; off < s.start + s.length; off += CHUNK) {
      const len = Math.min(CHUNK, s.start + s.length - off);
      await target.write(off, await read(off, len));
      moved += len;
    }
  }
  await target.flush();
  return moved;
}
