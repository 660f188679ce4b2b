/**
 * A pool user killed (SIGKILL) in a snapshot delete's commit down, while it writes:
 * `node commit-down-child.ts POOL_DIR STAGE` (STAGE: in-sync | recorded, PoolOptions.hooks.commitDown).
 * Volume `v` (8 MiB) with its only snapshot `s` must exist. Prints `ack OFFSET SEED` for each write
 * acknowledged (4 KiB at OFFSET, pattern SEED), before and during the delete.
 */
import { Qcow2Pool } from '../../plugins/qcow2/pool/pool-backend.js';
import { pattern } from './pool-helpers.js';

const [dir, stage] = process.argv.slice(2) as [string, string];
let writes = 0;
const pool = new Qcow2Pool({
  name: 'local', dir, format: 'qcow2', clusterSize: 65536, allowBackingOutsidePool: false,
  // Killed at the stage once writes have gone on during the commit.
  hooks: { commitDown: (at) => { if (at === stage) process.kill(process.pid, 'SIGKILL'); } },
});
const dev = await pool.openVolume('v', 'rw');
const ack = async (i: number) => {
  const off = ((i * 2654435761) % 2048) * 4096;
  await dev.write(off, pattern(1000 + i, 4096));
  process.stdout.write(`ack ${off} ${1000 + i}\n`);
};
for (; writes < 50; writes++) await ack(writes);
let deleting = true;
const writer = (async () => { while (deleting) await ack(writes++); })();
await pool.deleteSnapshot('v', 's');
deleting = false;
await writer;
process.stdout.write('not killed\n');
