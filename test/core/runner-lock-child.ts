/** Holds a runner's lock (core/jobs/runner-lock.ts) until killed: `node --import tsx test/core/runner-lock-child.ts DIR TOKEN`. */
import { RunnerLocks } from '../../core/jobs/runner-lock.js';

const [dir, token] = process.argv.slice(2) as [string, string];
new RunnerLocks(dir).hold(token);
process.stdout.write('held\n');
setInterval(() => undefined, 60_000);
