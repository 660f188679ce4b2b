/** Runs the offload CLI core with only the in-memory test backend (for CLI tests of the core verbs). */
import { runCli } from '../../core/index.js';
import { memoryModule } from './memory-backend.js';

process.exitCode = await runCli(process.argv.slice(2), { plugins: [memoryModule] });
