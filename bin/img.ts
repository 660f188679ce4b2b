/**
 * `offload img …` as bin/offload runs it: qemu-img–style commands on files, with no config, broker
 * or backend. Its own bundle (scripts/bundle-cli.mjs) holds only the command line and the qcow2
 * commands — not the broker verbs that bin/main.ts registers — so that a qemu-img–style call
 * starts as soon as we can make it. Bad usage exits 1, as qemu-img's does.
 *
 * No top-level await: the bundle is CommonJS.
 */
// Straight from its module, not through core/index.ts: a lazy import() there would make esbuild
// split the command line into a chunk of its own, one more file for every other command to load.
import { runCommandLine } from '../core/cli/command-line.js';
import { imgCliContribution } from '../plugins/qcow2/cli/index.js';
import { directStdio, exitQuietlyOnEpipe } from './stdio.js';

exitQuietlyOnEpipe();
void runCommandLine(process.argv.slice(2), {
  register: (program, ctx) => imgCliContribution.register(program, ctx),
  io: directStdio(),
  usageExitCode: 1,
}).then((code) => {
  process.exitCode = code;
});
