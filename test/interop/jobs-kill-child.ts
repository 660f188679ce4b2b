/**
 * Child process for the kill tests: runs one chain job on files in a folder and SIGKILLs itself
 * just before its Nth write to an image file (N from the parent; 0 = never, then it prints how
 * many writes the job made). The jobs run as the CLI and the broker run them (the tasks: deferred
 * metadata, background writeback); every checkpoint goes to a state file so the parent can resume.
 *   node --import tsx jobs-kill-child.ts JOB DIR KILL_AT STATE_FILE
 */
import { ImageFile } from '../../plugins/qcow2/engine/file.js';
import { openImage } from '../../plugins/qcow2/index.js';
import { commitTask, copyToRaw, streamTask } from '../../plugins/qcow2/jobs/index.js';
import { fileContext } from './jobs-kill-support.js';

const [job, dir, killAtArg, stateFile] = process.argv.slice(2);
const killAt = Number(killAtArg);
let writes = 0;
const write = ImageFile.prototype.write;
ImageFile.prototype.write = async function (pos: number, data: Uint8Array) {
  if (++writes === killAt) process.kill(process.pid, 'SIGKILL');
  return write.call(this, pos, data);
};

const ctx = fileContext(stateFile!, { autoComplete: true });
if (job === 'raw') {
  // Raw target writes go through fs directly; count chunks instead via checkpoints.
  ctx.onCheckpoint = () => { if (++writes === killAt) process.kill(process.pid, 'SIGKILL'); };
  const src = await openImage(`${dir}/top.qcow2`);
  await copyToRaw(src, `${dir}/out.raw`, ctx);
  await src.close();
} else {
  const top = `${dir}/top.qcow2`;
  if (job === 'stream') await streamTask(top).run(ctx);
  else if (job === 'stream-base') await streamTask(top, { base: 'base.qcow2' }).run(ctx);
  else if (job === 'commit') await commitTask(top, { top: 'mid.qcow2' }).run(ctx);
  else if (job === 'active') await commitTask(top, { active: true, base: 'base.qcow2' }).run(ctx);
  else throw new Error(`unknown job ${job}`);
}
process.stdout.write(`writes=${writes}\n`);
