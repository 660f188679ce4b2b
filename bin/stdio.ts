/**
 * A reader that goes away (`offload img map … | head -1`) ends the command quietly, as SIGPIPE
 * ends qemu-img, instead of an unhandled 'error' event with a stack trace.
 */
export function exitQuietlyOnEpipe(): void {
  for (const stream of [process.stdout, process.stderr]) {
    stream.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'EPIPE') process.exit(141); // 128 + SIGPIPE, what a shell reports for qemu-img
      throw e;
    });
  }
}
