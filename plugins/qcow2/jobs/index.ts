/**
 * qcow2 chain jobs — public API (used by the local pool and by `offload img stream|commit|rebase`).
 *
 * Every job works on an image that is already open (read-write) and may be shared with live
 * readers and writers, reports progress in bytes through the core's JobContext and calls
 * `await ctx.checkpoint(bytes, state)` after each chunk (speed limit, pause, cancel). The `state`
 * saved there lets a re-run resume; every job is also safe to simply run again after a crash.
 * Crash safety: the data a job copies is flushed before any header rewrite, and the header is
 * rewritten in one write of its first page, so a kill at any instant leaves a chain that reads
 * as before the switch or as after it.
 *
 *   runStream(image, { base? }, ctx)
 *     Copy into `image` every range it does not allocate that is allocated in a layer above
 *     `base` (no base: the whole chain), zero ranges as zero clusters; then flush and point the
 *     image at `base` (or at nothing). The open image switches to the new backing in memory too.
 *     Cancel leaves the chain valid and unchanged in meaning.
 *
 *   runCommit(image, { top?, base?, active? }, ctx)
 *     Write the ranges allocated in `top` (default: `image` itself) and the layers between it
 *     and `base` (default: top's backing) into `base`, growing base when top is larger.
 *     - top below `image` (intermediate commit): then re-points the layer above `top` (in the
 *       open chain) at `base`; the committed layers are no longer part of the chain.
 *     - top = image, `active: false`: a plain commit (qemu-img commit -d); nothing switches.
 *       `makeEmpty(image)` then empties the top as qemu-img commit does without -d.
 *     - top = image, `active: true`: a mirror. `ctx.ready()` once base is in sync; base is kept
 *       in sync while writes continue; after `await ctx.waitForComplete()` the open `image`
 *       object is pivoted atomically onto base: from then on every call on it (reads, writes,
 *       flush, close, path, chain, …) goes to base, opened read-write; the top file is closed
 *       and is no longer in the chain. Cancel before complete: the top stays the active image
 *       (nothing lost; base holds some of top's data, below it, which changes nothing it reads).
 *
 *   runRebase(image, { backing, backingFormat?, unsafe? }, ctx)
 *     Safe (default): copy into `image` every cluster it does not allocate whose content differs
 *     between the old and the new backing chain, flush, then rewrite the header (`backing: ''`
 *     flattens). Unsafe: header only. Relative `backing` names resolve against the image's folder,
 *     as qemu-img does, and are stored as given.
 *
 *   streamTask(path, { base? }), commitTask(path, { top?, base?, active?, empty? }),
 *   rebaseTask(path, { backing, backingFormat?, unsafe? })
 *     → a core JobTask that opens the file itself (for the CLI and for resuming after a restart:
 *       `params` are plain JSON and enough to resume; `ctx.resumeFrom` continues where it stopped).
 *
 *   copyToRaw(source, targetPath, ctx) / rawCopyTask(sourcePath, targetPath)
 *     Stream the whole chain of `source` into a raw file. A raw target has no allocation metadata,
 *     so progress lives in an external bitmap file `<target>.progress` beside it; an interrupted
 *     copy resumes from it, and it is removed when the copy is done.
 *
 *   makeEmpty(image): unallocate every cluster of a qcow2 image (reads then come from its backing).
 *
 * Names given as `base`/`top` match a chain entry by its path (absolute, or relative to the
 * current folder), by its name as stored in the header above it, or relative to the image's folder.
 * Errors: NotFound (no such layer in the chain), InvalidArgument (top = base, base above top),
 * FailedPrecondition (image open read-only), Unsupported (a raw top), Cancelled.
 */
export { runStream, type StreamOptions } from './stream.js';
export { runCommit, makeEmpty, type CommitOptions } from './commit.js';
export { runRebase, type RebaseOptions } from './rebase.js';
export { copyToRaw, rawCopyTask, progressPathFor } from './copy-to-raw.js';
export { streamTask, commitTask, rebaseTask, type StreamTaskParams, type CommitTaskParams, type RebaseTaskParams } from './tasks.js';
