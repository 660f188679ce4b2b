/**
 * Child process for the broker-restart tests: opens a broker on an existing pool and state dir,
 * starts a rate-limited job, prints the job id, and runs until killed.
 *   node --import tsx job-child.ts stream|clone|export|import|backup STATE_DIR POOL_DIR [FILE]
 * stream: local/kid; clone: local/src into a new local/dst through the host; export: local/src
 * into the qcow2 file FILE; import: the raw file FILE into local/dst; backup: local/src into the
 * backup volume local/set. Checkpoints are
 * saved as the broker saves them (at most once a second): what a kill may cost.
 */
import { createBroker, silentLogger } from '../../core/index.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';

const [kind, state, pool, file] = process.argv.slice(2);
// OFFLOAD_TEST_LEASE_SECONDS: a short lease, for the tests of takeovers (job-leases.test.ts).
const lease = process.env.OFFLOAD_TEST_LEASE_SECONDS;
const broker = await createBroker(
  { state: state!, ...(lease ? { leaseSeconds: Number(lease) } : {}), backends: [{ name: 'local', kind: 'qcow2', path: pool! }] },
  { plugins: [qcow2Module], logger: silentLogger },
);
// OFFLOAD_TEST_SPEED: another speed limit (0: none), for a copy that runs in one native window.
const speed = process.env.OFFLOAD_TEST_SPEED !== undefined ? Number(process.env.OFFLOAD_TEST_SPEED) : 4 * 1024 * 1024;
const job = kind === 'stream' ? await broker.stream('local/kid', { speed })
  : kind === 'export' ? await broker.volumes.exportTo('local/src', file!, { format: 'qcow2', speed })
    : kind === 'import' ? await broker.volumes.importFrom(file!, 'local/dst', { format: 'raw', speed })
      : kind === 'backup' ? await broker.backups.start('local/src', { to: 'local/set', speed })
      : (await broker.startClone('local/src', 'local/dst', { mode: 'full', speed })).job!;
process.stdout.write(`${job.id}\n`);
try {
  await job.wait();
  process.stdout.write('concluded\n');
} catch (e) {
  // A runner that lost its job (taken over by another) says so and stops.
  process.stdout.write(`stopped: ${(e as Error).message}\n`);
  process.exitCode = 3;
}
