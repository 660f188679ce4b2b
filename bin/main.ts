/** The `offload` executable: the core CLI with the built-in plugins. */
import { runCli } from '../core/index.js';

// A reader that goes away (`offload img map … | head -1`) ends the command quietly, as SIGPIPE
// ends qemu-img, instead of an unhandled 'error' event with a stack trace.
for (const stream of [process.stdout, process.stderr]) {
  stream.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(141); // 128 + SIGPIPE, what a shell reports for qemu-img
    throw e;
  });
}

const argv = process.argv.slice(2);
let code: number;
if (argv[0] === 'img') {
  // `offload img` works on files: no config, broker or backend. It is started with the qcow2
  // plugin's contribution alone, so that a qemu-img–style call starts about as fast as qemu-img,
  // and bad usage exits 1, as qemu-img's does.
  const { imgCliContribution } = await import('../plugins/qcow2/cli/index.js');
  code = await runCli(argv, { plugins: [], contributions: [imgCliContribution], usageExitCode: 1 });
} else {
  const { builtinPlugins } = await import('../plugins/index.js');
  code = await runCli(argv, { plugins: builtinPlugins });
}
process.exitCode = code;
