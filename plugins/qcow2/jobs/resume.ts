/** Reading a job's saved checkpoint defensively: a bad or foreign state means "start over". */
export function resumeOffset(state: unknown, size: number, align: number): number {
  if (typeof state !== 'object' || state === null) return 0;
  const off = (state as { offset?: unknown }).offset;
  if (typeof off !== 'number' || !Number.isSafeInteger(off) || off < 0 || off > size) return 0;
  return off - (off % align);
}

/** Chunk of guest bytes a job examines between checkpoints (a multiple of every cluster size). */
export const JOB_CHUNK = 4 << 20;
