/** Runs the offload CLI core with the test backends (memory, ticker) for CLI tests of the core verbs. */
import { runCli } from '../../core/index.js';
import { memoryModule } from './memory-backend.js';
import { tickerModule } from './ticker-backend.js';

process.exitCode = await runCli(process.argv.slice(2), { plugins: [memoryModule, tickerModule] });
