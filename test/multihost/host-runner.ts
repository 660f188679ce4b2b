/**
 * A broker "host" for multihost.test.ts: a long-running broker on a shared PostgreSQL state (as
 * `offload serve` runs one) with a one-second lease, its own local pool, and the shared mock
 * appliances. It takes over orphaned jobs it can run, and prints one JSON line per event:
 *   {"ready":true,"pid":N}  {"takeover":JOB,"fence":N}  {"fenced":JOB}  {"job":ID} (a job it started)
 * Commands on stdin, one per line: `copy SRC DST SPEED`, `stream REF [SPEED]`.
 *   node --import tsx host-runner.ts CONFIG.json
 * SIGTERM closes the broker (its jobs are released for another runner) and exits 0.
 */
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { createBroker, silentLogger, type RawConfig } from '../../core/index.js';
import { builtinPlugins } from '../../plugins/index.js';

const config = JSON.parse(readFileSync(process.argv[2]!, 'utf8')) as RawConfig;
const say = (o: object) => process.stdout.write(`${JSON.stringify(o)}\n`);
const broker = await createBroker(config, {
  plugins: builtinPlugins, logger: silentLogger, recoverJobs: false, adoptOrphans: { everyMs: 100 }, checkpointEveryMs: 0,
  onJobEvent: (e) => say(e.type === 'takeover' ? { takeover: e.job, fence: e.fence } : { fenced: e.job }),
});
say({ ready: true, pid: process.pid });
createInterface({ input: process.stdin }).on('line', (line) => {
  const [verb, a, b, speed] = line.trim().split(/\s+/);
  const started = verb === 'copy' ? broker.copy(a!, b!, { speed: Number(speed) }) : broker.stream(a!, b ? { speed: Number(b) } : {});
  started.then((job) => say({ job: job.id }), (e: Error) => say({ error: e.message }));
});
process.on('SIGTERM', () => void broker.close().then(() => process.exit(0)));
