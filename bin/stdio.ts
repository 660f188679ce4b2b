import { writeSync } from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

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

/**
 * Output streams for `offload img` that write straight to descriptors 1 and 2 (writeSync), so
 * that a command that prints a few lines (`img info`, `img map`) does not make Node's stream for
 * them: making process.stdout for a pipe loads net and the stream modules, ~4 ms of a ~27 ms run.
 * The descriptors are left as the caller gave them (blocking, unless the caller made them
 * non-blocking: then EAGAIN hands the rest to process.stdout, which waits for the reader).
 */
export function directStdio(): { stdout: DirectWriter; stderr: DirectWriter } {
  return { stdout: new DirectWriter(1, 'stdout'), stderr: new DirectWriter(2, 'stderr') };
}

class DirectWriter {
  private stream: NodeJS.WriteStream | undefined;

  constructor(private readonly fd: number, private readonly name: 'stdout' | 'stderr') {}

  /** Only progress bars ask; node:tty (which loads net) is loaded then. */
  get isTTY(): boolean {
    return (require('node:tty') as typeof import('node:tty')).isatty(this.fd);
  }

  write(s: string): boolean {
    if (this.stream) return this.stream.write(s);
    const buf = Buffer.from(s);
    let done = 0;
    try {
      while (done < buf.length) done += writeSync(this.fd, buf, done);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EPIPE') process.exit(141); // as the stream's handler above does
      if (code !== 'EAGAIN') throw e;
      this.stream = process[this.name];
      return this.stream.write(buf.subarray(done));
    }
    return true;
  }
}
