/**
 * qcow2 chain jobs — their public module (used by the local pool and by `offload img
 * stream|commit|rebase`): stream, commit, rebase and the copy into a raw file, as functions on an
 * open Image and as core JobTasks that open the file themselves. What each does, resumes and
 * refuses: plugins/qcow2/README.md ("Chain jobs").
 */
export { runStream, type StreamOptions } from './stream.js';
export { runCommit, makeEmpty, type CommitOptions } from './commit.js';
export { runRebase, type RebaseOptions } from './rebase.js';
export { copyToRaw, rawCopyTask, progressPathFor } from './copy-to-raw.js';
export { streamTask, commitTask, rebaseTask, type StreamTaskParams, type CommitTaskParams, type RebaseTaskParams } from './tasks.js';
