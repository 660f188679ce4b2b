/** The `offload` executable: the core CLI with the built-in plugins. */
import { runCli } from '../core/index.js';
import { exitQuietlyOnEpipe } from './stdio.js';

exitQuietlyOnEpipe();

const argv = process.argv.slice(2);
let code: number;
if (argv[0] === 'img') {
  // `offload img` works on files: no config, broker or backend. It is started with the qcow2
  // plugin's contribution alone, and bad usage exits 1, as qemu-img's does. bin/offload does not
  // come here: it runs bin/img.ts's own bundle, which starts faster; this serves
  // `node dist/cli/main.js img …` and the tests that run this file.
  const { imgCliContribution } = await import('../plugins/qcow2/cli/index.js');
  code = await runCli(argv, { plugins: [], contributions: [imgCliContribution], usageExitCode: 1 });
} else {
  const { builtinPlugins } = await import('../plugins/index.js');
  code = await runCli(argv, { plugins: builtinPlugins });
}
process.exitCode = code;
