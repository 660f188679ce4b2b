/**
 * A reader that goes away (`offload img map … | head -1`) ends the command quietly, as SIGPIPE
 * ends qemu-img, instead of an unhandled 'error' event with a stack trace.
 *
 * The handler is attached when process.stdout or process.stderr is first used, not here: Node
 * creates those streams lazily, and creating one (a pipe's socket, with the stream modules it
 * loads) is a few milliseconds of an `offload img convert` that never prints.
 */
export function exitQuietlyOnEpipe(): void {
  for (const name of ['stdout', 'stderr'] as const) {
    const desc = Object.getOwnPropertyDescriptor(process, name);
    if (!desc?.get || !desc.configurable) {
      quiet(process[name]);
      continue;
    }
    const create = desc.get;
    Object.defineProperty(process, name, {
      configurable: true,
      enumerable: desc.enumerable,
      get() {
        const stream = create.call(process) as NodeJS.WriteStream;
        quiet(stream);
        // From now on the stream itself (Node keeps the one it made).
        Object.defineProperty(process, name, { configurable: true, enumerable: desc.enumerable, value: stream, writable: true });
        return stream;
      },
    });
  }
}

function quiet(stream: NodeJS.WriteStream): void {
  stream.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(141); // 128 + SIGPIPE, what a shell reports for qemu-img
    throw e;
  });
}
