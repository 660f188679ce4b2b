/**
 * Child process for the kill tests: runs one chain job on files in a folder and SIGKILLs itself
 * just before its Nth write to an image file (N from the parent; 0 = never, then it prints how
 * many writes the job made). Checkpoints go to a state file so the parent can resume.
 *   node --import tsx jobs-kill-child.ts JOB DIR KILL_AT STATE_FILE
 */
import { ImageFile } from '../../plugins/qcow2/engine/file.js';
import { openImage } from '../../plugins/qcow2/index.js';
import { copyToRaw, runCommit, runStream } from '../../plugins/qcow2/jobs/index.js';
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
  const img = await openImage(`${dir}/top.qcow2`, { readOnly: false });
  if (job === 'stream') await runStream(img, {}, ctx);
  else if (job === 'stream-base') await runStream(img, { base: 'base.qcow2' }, ctx);
  else if (job === 'commit') await runCommit(img, { top: 'mid.qcow2' }, ctx);
  else if (job === 'active') await runCommit(img, { active: true, base: 'base.qcow2' }, ctx);
  else throw new Error(`unknown job ${job}`);
  await img.close();
}
process.stdout.write(`writes=${writes}\n`);
