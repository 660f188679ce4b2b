/** The `offload` executable: the core CLI with the built-in plugins. */
import { runCli } from '../core/index.js';

const argv = process.argv.slice(2);
let code: number;
if (argv[0] === 'img') {
  // `offload img` works on files: no config, broker or backend. It is started with the qcow2
  // plugin's contribution alone, so that a qemu-img–style call starts about as fast as qemu-img.
  const { imgCliContribution } = await import('../plugins/qcow2/cli/index.js');
  code = await runCli(argv, { plugins: [], contributions: [imgCliContribution] });
} else {
  const { builtinPlugins } = await import('../plugins/index.js');
  code = await runCli(argv, { plugins: builtinPlugins });
}
process.exitCode = code;
