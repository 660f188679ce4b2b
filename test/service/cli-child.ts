/** `offload` as bin/main.ts runs it, with the test backend `ticker` (a slow, resumable stream) beside the built-in plugins. */
import { runCli } from '../../core/index.js';
import { builtinPlugins } from '../../plugins/index.js';
import { tickerModule } from '../support/ticker-backend.js';

process.exitCode = await runCli(process.argv.slice(2), { plugins: [...builtinPlugins, tickerModule] });
