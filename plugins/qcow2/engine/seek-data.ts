/**
 * Where a file's data is, from lseek(SEEK_DATA / SEEK_HOLE), which Node does not expose: an
 * optional native addon (native/seek, built by `npm run build:native`, part of `npm install`)
 * provides it. Without the addon, or on a file system that cannot seek holes, `dataExtents`
 * returns undefined and callers fall back to reading the content.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

interface SeekAddon {
  /** The offset lseek(fd, offset, whence) returns, -1 for ENXIO; throws (with `code`) on other errors. */
  seek(fd: number, offset: number, whence: 0 | 1): number;
}

const SEEK_DATA = 0;
const SEEK_HOLE = 1;
const ADDON = join('native', 'seek', 'build', 'Release', 'offload_seek.node');

let addon: SeekAddon | null | undefined; // undefined: not loaded yet; null: unavailable
let forcedOff = false;

/**
 * The addon, from the package root: the first folder above this module that holds package.json
 * (this file runs from plugins/qcow2/engine/ under tsx/vitest and from dist/plugins/qcow2/engine/
 * when built, and dist/ has no package.json).
 */
function load(): SeekAddon | null {
  if (addon !== undefined) return addon;
  addon = null;
  for (let dir = dirname(fileURLToPath(import.meta.url)); ; ) {
    if (existsSync(join(dir, 'package.json'))) {
      const path = join(dir, ADDON);
      if (existsSync(path)) {
        try {
          const mod = createRequire(import.meta.url)(path) as Partial<SeekAddon>;
          if (typeof mod.seek === 'function') addon = mod as SeekAddon;
        } catch {
          // built for another Node ABI or platform: behave as if it were not built
        }
      }
      break;
    }
    const up = dirname(dir);
    if (up === dir) break;
    dir = up;
  }
  return addon;
}

/** Whether the native helper is loaded (and not switched off with `setSeekDataEnabled(false)`). */
export function seekDataAvailable(): boolean {
  return !forcedOff && load() !== null;
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
  const a = forcedOff ? null : load();
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
