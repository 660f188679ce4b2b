/**
 * A pool user killed (SIGKILL) while it deletes the oldest of two snapshots by committing the
 * newer one's layer down: `node commit-child-down-child.ts POOL_DIR STAGE` (STAGE:
 * PoolOptions.hooks.commitChildDown's). Volume `v` with snapshots `s1` and `s2` must exist; `s1`
 * is deleted while a writer writes through the open volume. Prints `ack OFFSET SEED` for each
 * write acknowledged (4 KiB at OFFSET, pattern SEED).
 */
import { Qcow2Pool } from '../../plugins/qcow2/pool/pool-backend.js';
import { pattern } from './pool-helpers.js';

const [dir, stage] = process.argv.slice(2) as [string, string];
const pool = new Qcow2Pool({
  name: 'local', dir, format: 'qcow2', clusterSize: 65536, allowBackingOutsidePool: false,
  hooks: { commitChildDown: (at) => { if (at === stage) process.kill(process.pid, 'SIGKILL'); } },
});
const dev = await pool.openVolume('v', 'rw');
let writes = 0;
const ack = async (i: number) => {
  const off = ((i * 2654435761) % 2048) * 4096;
  await dev.write(off, pattern(1000 + i, 4096));
  process.stdout.write(`ack ${off} ${1000 + i}\n`);
};
for (; writes < 30; writes++) await ack(writes);
let deleting = true;
const writer = (async () => { while (deleting) await ack(writes++); })();
await pool.deleteSnapshot('v', 's1');
deleting = false;
await writer;
process.stdout.write('not killed\n');
