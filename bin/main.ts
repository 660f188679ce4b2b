/** The `offload` executable: the core CLI with the built-in plugins. */
import { runCli } from '../core/cli/run-cli.js';
import { builtinPlugins } from '../plugins/index.js';

const code = await runCli(process.argv.slice(2), { plugins: builtinPlugins });
process.exitCode = code;
