/**
 * `convert`'s copy: the guest content of an image (with its backing chain) into a new image,
 * through the core copier over two image devices, so the native helper moves what it can
 * (image-device.ts) and the rest is read and written with blocks of zeros left out.
 */
import { copyData, JobRun } from '../../../core/index.js';
import { imageDevice } from './image-device.js';
import type { Image } from './types.js';

export interface CopyProgress {
  update(current: number, total: number): void;
}

/** Copy every non-zero byte of `src` into `dst`, a new image that reads as zeros; progress in bytes of the virtual size. */
export async function copyImageContent(src: Image, dst: Image, progress?: CopyProgress): Promise<void> {
  const size = src.virtualSize;
  const run = new JobRun({
    jobId: 'convert',
    onProgress: (current, total) => progress?.update(total === 0 ? size : Math.min(size, Math.floor((current / total) * size)), size),
  });
  await copyData(await imageDevice(src, { mode: 'r' }), await imageDevice(dst, { mode: 'rw' }), run, { targetFresh: true });
  progress?.update(size, size);
}
