/**
 * Where a file's data is, from lseek(SEEK_DATA / SEEK_HOLE), which Node does not expose: the
 * optional native addon (native-addon.ts) provides it. Without the addon, or on a file system
 * that cannot seek holes, `dataExtents` returns undefined and callers fall back to reading the
 * content.
 */
import { nativeAddon } from './native-addon.js';

const SEEK_DATA = 0;
const SEEK_HOLE = 1;

let forcedOff = false;

/** Whether the native helper is loaded (and not switched off with `setSeekDataEnabled(false)`). */
export function seekDataAvailable(): boolean {
  return !forcedOff && nativeAddon() !== null;
}

/** Switch the native helper off (tests of the fallback) or back on. */
export function setSeekDataEnabled(enabled: boolean): void {
  forcedOff = !enabled;
}

/**
 * The [start, end) ranges of `fd` that hold data within [start, end), in order, clipped to the
 * range; what lies between them (and past the end of the file) is a hole. Undefined when the
 * addon is not available or the file system cannot say (EINVAL, ENOTSUP). Other errors throw.
 */
export function dataExtents(fd: number, start: number, end: number): [number, number][] | undefined {
  const a = forcedOff ? null : nativeAddon();
  if (!a) return undefined;
  const out: [number, number][] = [];
  try {
    for (let pos = start; pos < end;) {
      const data = a.seek(fd, pos, SEEK_DATA);
      if (data < 0 || data >= end) break; // no more data (ENXIO), or none before `end`
      if (data < pos) return undefined; // not a valid answer: do not trust the file system
      let hole = a.seek(fd, data, SEEK_HOLE);
      if (hole < 0) hole = end; // the file shrank under us: treat the rest as data, read will say
      if (hole <= data) return undefined; // not a valid answer: do not trust the file system
      out.push([data, Math.min(hole, end)]);
      pos = hole;
    }
  } catch (e) {
    const code = (e as NodeJS.ErrnoException)?.code;
    if (code === 'EINVAL' || code === 'ENOTSUP' || code === 'EOPNOTSUPP') return undefined;
    throw e;
  }
  return out;
}
