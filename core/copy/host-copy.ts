import type { BlockDevice } from '../backend/block-device.js';
import type { JobContext, JobTask } from '../jobs/job-task.js';
import { copyData } from './copier.js';

export interface HostCopyParams extends Record<string, unknown> {
  source: string;
  target: string;
  /** The target was created empty for this copy: unallocated source ranges can be skipped. */
  targetFresh: boolean;
  /** Compare checksums of source and target after the copy. */
  verify?: boolean;
}

/** Opens a ref's data path; provided by the broker. */
export type DeviceOpener = (ref: string, mode: 'r' | 'rw') => Promise<BlockDevice>;

/**
 * The host data mover as a JobTask: opens both data paths and runs the copier between them. Its
 * params are plain JSON, so a restarted broker rebuilds it and the copy resumes from its checkpoint.
 */
export function hostCopyTask(params: HostCopyParams, open: DeviceOpener, type = 'copy'): JobTask {
  return {
    type,
    params,
    async run(ctx: JobContext) {
      const src = await open(params.source, 'r');
      let dst: BlockDevice | undefined;
      try {
        dst = await open(params.target, 'rw');
        await copyData(src, dst, ctx, { targetFresh: params.targetFresh, verify: params.verify === true });
      } finally {
        await Promise.allSettled([src.close(), dst?.close()]);
      }
    },
  };
}
