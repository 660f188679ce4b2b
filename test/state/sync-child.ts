/**
 * A process that opens the SQLite state store in FILE, makes COUNT writes of one kind, closes it
 * and prints "done": durability.test.ts counts the syncs of its write-ahead log under strace.
 *   node --import tsx test/state/sync-child.ts FILE KIND COUNT
 */
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';
import type { JobRecord } from '../../core/state/records.js';

const [file, kind, count] = process.argv.slice(2) as [string, string, string];
const store = new SqliteStateStore(file);
const now = new Date().toISOString();
const job: JobRecord = {
  id: 'job-1', type: 'mirror', status: 'running', executor: 'host', ref: 'pool/a', owner: 'admin', ownerRole: 'admin',
  progress: { current: 0, total: 1 }, speed: 0, cancelled: false, params: {}, createdAt: now, updatedAt: now,
  runnerPid: process.pid, runnerToken: 'tok', runnerHost: 'here', leaseExpires: Date.now() + 60_000, seenAt: Date.now(), fence: 1, locks: [],
};
if (kind !== 'open') await store.transaction('locks', (tx) => tx.insertJob(job));
for (let i = 0; i < Number(count); i++) {
  if (kind === 'checkpoint') {
    if (!(await store.updateJob({ ...job, checkpoint: { i } }))) throw new Error('the job was not updated');
  } else if (kind === 'lease') {
    await store.renewLease(job.id, job.runnerToken, job.fence, Date.now() + 60_000);
  } else if (kind === 'claim') {
    await store.claimOpLocks({ id: `op-${i}`, locks: [{ key: `pool/v${i}`, mode: 'exclusive' }], principal: 'admin', role: 'admin', description: 'create', runnerPid: process.pid, runnerToken: 'tok', runnerHost: 'here', leaseExpires: Date.now() + 60_000 });
    await store.deleteOpLocks(`op-${i}`);
  }
}
await store.close();
process.stdout.write('done\n');
