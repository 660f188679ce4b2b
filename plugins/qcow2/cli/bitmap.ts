/**
 * `qemu-img bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
 * [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] FILENAME BITMAP`: the actions run in the order
 * given, on one read-write open of the image, as qemu-img runs them; a failing action stops the
 * rest and is reported as qemu-img reports it ("Operation add on bitmap b0 failed: …").
 */
import { isOffloadError, UsageError, type OffloadError } from '../../../core/index.js';
import { resolve } from 'node:path';
import { openImage, type Image, type ImageFormat } from '../engine/index.js';

export type BitmapAction = { kind: 'add' | 'remove' | 'clear' | 'enable' | 'disable' } | { kind: 'merge'; source: string };

export interface BitmapRequest {
  file: string;
  bitmap: string;
  actions: BitmapAction[];
  format?: ImageFormat;
  granularity?: number;
  /** -b / -F: the image the merge source bitmap lives in (default: the image itself). */
  sourceFile?: string;
  sourceFormat?: ImageFormat;
}

/** qemu-img's own checks of the option combination, before anything is opened. */
export function checkBitmapRequest(r: BitmapRequest): void {
  if (r.actions.length === 0) throw new UsageError('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
  const merging = r.actions.some((a) => a.kind === 'merge');
  if (r.granularity !== undefined && !r.actions.some((a) => a.kind === 'add')) throw new UsageError('granularity only supported with --add');
  if (r.sourceFormat !== undefined && r.sourceFile === undefined) throw new UsageError('-F only supported with -b');
  if (r.sourceFile !== undefined && !merging) throw new UsageError('Merge bitmap source file only supported with --merge');
}

export async function runBitmap(r: BitmapRequest): Promise<void> {
  checkBitmapRequest(r);
  const img = await openImage(r.file, { readOnly: false, noBacking: true, ...(r.format ? { format: r.format } : {}) });
  let source: Image | undefined;
  try {
    for (const a of r.actions) {
      try {
        switch (a.kind) {
          case 'add': await img.bitmaps.add(r.bitmap, r.granularity !== undefined ? { granularity: r.granularity } : {}); break;
          case 'remove': await img.bitmaps.remove(r.bitmap); break;
          case 'clear': await img.bitmaps.clear(r.bitmap); break;
          case 'enable': await img.bitmaps.enable(r.bitmap); break;
          case 'disable': await img.bitmaps.disable(r.bitmap); break;
          case 'merge':
            if (r.sourceFile !== undefined) {
              source ??= await openImage(r.sourceFile, { readOnly: true, noBacking: true, ...(r.sourceFormat ? { format: r.sourceFormat } : {}) });
            }
            await img.bitmaps.merge(r.bitmap, { image: source ?? img, name: a.source });
            break;
        }
      } catch (e) {
        throw failed(e, a.kind, r.bitmap, [r.file, r.sourceFile]);
      }
    }
  } finally {
    await source?.close();
    await img.close();
  }
}

/** The engine's error, its message in qemu-img's words: "Operation OP on bitmap NAME failed: …". */
function failed(e: unknown, op: string, bitmap: string, paths: (string | undefined)[]): unknown {
  if (!isOffloadError(e)) return e;
  let msg = e.message;
  for (const p of paths.filter((x) => x !== undefined).map((x) => resolve(x))) if (msg.startsWith(`${p}: `)) msg = msg.slice(p.length + 2);
  const Ctor = e.constructor as new (m: string, o: object) => OffloadError;
  return new Ctor(`Operation ${op} on bitmap ${bitmap} failed: ${msg}`, { ref: e.ref, hint: e.hint, cause: e });
}
