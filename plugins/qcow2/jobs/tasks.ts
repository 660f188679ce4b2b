/**
 * The jobs as core JobTasks that open the image themselves: what the CLI runs and what a
 * restarted broker rebuilds from the stored params (`ctx.resumeFrom` carries the checkpoint).
 */
import { closeAfter, type JobContext, type JobTask } from '../../../core/index.js';
import { openImage, type Image } from '../engine/index.js';
import { makeEmpty, runCommit } from './commit.js';
import { runRebase } from './rebase.js';
import { runStream } from './stream.js';

export interface StreamTaskParams { base?: string | undefined }
export interface CommitTaskParams {
  top?: string | undefined;
  base?: string | undefined;
  active?: boolean | undefined;
  /** After a plain commit of the image itself, unallocate its clusters (qemu-img commit without -d). */
  empty?: boolean | undefined;
}
export interface RebaseTaskParams { backing: string; backingFormat?: string | undefined; unsafe?: boolean | undefined }

/** JSON-only params: drop undefined fields so stored params round-trip exactly. */
function clean(o: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined));
}

/**
 * Run a job on the image at `path`, opened read-write with deferred metadata (written in
 * batches, as QEMU's cache does, not per copied run).
 */
async function withImage(path: string, ctx: JobContext, fn: (img: Image) => Promise<void>): Promise<void> {
  const img = await openImage(path, { readOnly: false, deferMetadata: true, writeBehind: true });
  try {
    await fn(img);
  } finally {
    await img.close(closeAfter(ctx));
  }
}

export function streamTask(path: string, opts: StreamTaskParams = {}): JobTask {
  return {
    type: 'stream',
    params: clean({ path, base: opts.base }),
    run: (ctx: JobContext) => withImage(path, ctx, (img) => runStream(img, { base: opts.base }, ctx)),
  };
}

export function commitTask(path: string, opts: CommitTaskParams = {}): JobTask {
  return {
    type: 'commit',
    params: clean({ path, top: opts.top, base: opts.base, active: opts.active, empty: opts.empty }),
    run: (ctx: JobContext) => withImage(path, ctx, async (img) => {
      const pivoted = await runCommit(img, { top: opts.top, base: opts.base, active: opts.active }, ctx);
      // After a pivot `img` forwards to the base; closing it closes the base.
      if (!pivoted && opts.empty && (opts.top === undefined || opts.top === '')) await makeEmpty(img);
    }),
  };
}

export function rebaseTask(path: string, opts: RebaseTaskParams): JobTask {
  return {
    type: 'rebase',
    params: clean({ path, backing: opts.backing, backingFormat: opts.backingFormat, unsafe: opts.unsafe }),
    run: (ctx: JobContext) => withImage(path, ctx, (img) => runRebase(img, opts, ctx)),
  };
}
