/**
 * Child process for the broker-restart test: opens a broker on an existing pool and state dir,
 * starts a rate-limited stream of local/kid, prints the job id, and runs until killed.
 */
import { createBroker, silentLogger } from '../../core/index.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';

const [state, pool] = process.argv.slice(2);
const broker = await createBroker({ state: state!, backends: [{ name: 'local', kind: 'qcow2', path: pool! }] }, { plugins: [qcow2Module], logger: silentLogger });
const job = await broker.stream('local/kid', { speed: 4 * 1024 * 1024 });
process.stdout.write(`${job.id}\n`);
await job.wait();
