/** Child process for the kill -9 test: starts a ticker stream job and runs until killed. */
import { createBroker } from '../../core/index.js';
import { tickerModule } from './ticker-backend.js';

const [stateDir, resumable, log] = process.argv.slice(2);
const broker = await createBroker(
  { state: stateDir!, backends: [{ name: 'tick', kind: 'ticker', steps: 200, stepMs: 25, resumable: resumable === 'true', log }] },
  { plugins: [tickerModule] },
);
const job = await broker.stream('tick/vol1');
process.stdout.write(`${job.id}\n`);
await job.wait();
