/**
 * Child process for job-takeover.test.ts: a long-running broker that takes over orphaned jobs (as
 * `offload serve` will), with a one-second lease, on a pool and state directory it shares.
 *   node --import tsx runner-child.ts STATE POOL [stream]
 * With `stream` it also starts a rate-limited stream of local/kid and prints its id; else "ready".
 * SIGTERM closes the broker (its jobs are released for another runner) and exits 0.
 */
import { createBroker, silentLogger } from '../../core/index.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';

const [state, pool, what] = process.argv.slice(2);
const broker = await createBroker({ state: state!, leaseSeconds: 1, backends: [{ name: 'local', kind: 'qcow2', path: pool! }] }, {
  plugins: [qcow2Module], logger: silentLogger, recoverJobs: false, adoptOrphans: { everyMs: 100 },
});
if (what === 'stream') process.stdout.write(`${(await broker.stream('local/kid', { speed: 4 * 1024 * 1024 })).id}\n`);
else process.stdout.write('ready\n');
const alive = setInterval(() => undefined, 1000);
process.on('SIGTERM', () => {
  clearInterval(alive);
  void broker.close().then(() => process.exit(0));
});
