/** Holds a runner's lock (core/jobs/runner-lock.ts) until killed: `node --import tsx test/core/runner-lock-child.ts DIR TOKEN`. */
import { RunnerLocks } from '../../core/jobs/runner-lock.js';

const [dir, token] = process.argv.slice(2) as [string, string];
const locks = new RunnerLocks(dir);
locks.hold(token);
process.stdout.write('held\n');
// Kept referenced: a collected RunnerLocks closes its database, and with it the lock.
setInterval(() => locks, 60_000);
