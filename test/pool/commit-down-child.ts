/**
 * A pool user killed (SIGKILL) in an active commit while it writes:
 * `node commit-down-child.ts POOL_DIR STAGE [job]` (STAGE: PoolOptions.hooks.activeCommit's).
 * Volume `v` (8 MiB) with its only snapshot `s` must exist. Without `job`, the commit is the
 * snapshot delete's commit down; with it, a commit job (`offload commit v --base s`). At
 * `switched` it is killed once 20 more writes are acknowledged on the new layer. Prints
 * `ack OFFSET SEED` for each write acknowledged (4 KiB at OFFSET, pattern SEED).
 */
import { JobRun } from '../../core/index.js';
import { Qcow2Pool } from '../../plugins/qcow2/pool/pool-backend.js';
import { pattern } from './pool-helpers.js';

const [dir, stage, how] = process.argv.slice(2) as [string, string, string | undefined];
let writes = 0;
let killAt = Infinity;
const pool = new Qcow2Pool({
  name: 'local', dir, format: 'qcow2', clusterSize: 65536, allowBackingOutsidePool: false,
  hooks: {
    activeCommit: (at) => {
      if (at !== stage) return;
      if (at === 'switched') killAt = writes + 20;
      else process.kill(process.pid, 'SIGKILL');
    },
  },
});
const dev = await pool.openVolume('v', 'rw');
const ack = async (i: number) => {
  const off = ((i * 2654435761) % 2048) * 4096;
  await dev.write(off, pattern(1000 + i, 4096));
  process.stdout.write(`ack ${off} ${1000 + i}\n`);
  if (i >= killAt) process.kill(process.pid, 'SIGKILL');
};
for (; writes < 50; writes++) await ack(writes);
let committing = true;
const writer = (async () => { while (committing || writes < killAt + 5) await ack(writes++); })();
if (how === 'job') await (await pool.commitVolume('v', { base: 's' })).run(new JobRun({ jobId: 'commit v' }));
else await pool.deleteSnapshot('v', 's');
committing = false;
await writer;
process.stdout.write('not killed\n');
