/**
 * How `offload img` commands write: qemu-img's text goes through the CLI context (stdout, or the
 * value as JSON with the global `--json`), diagnostics go to stderr, and non-zero qemu-img exit
 * codes (check's 2/3/63, compare's 1/2, io's 1) are set on the context.
 */
import type { CliContext } from '../../../core/index.js';

export interface ImgOutput {
  /** Print `text` (qemu-img's human or `--output=json` text, without its final newline); with the
   *  global `--json`, print `value` instead. */
  print(value: unknown, text: string): void;
  /** One diagnostic line on stderr (qemu-img's `error_report` / per-cluster check messages). */
  warn(line: string): void;
  setExitCode(code: number): void;
}

/** Where stderr lines go; tests pass their own. */
export type StderrSink = (line: string) => void;

export const processStderr: StderrSink = (line) => {
  process.stderr.write(line + '\n');
};

export function imgOutput(ctx: CliContext, stderr: StderrSink): ImgOutput {
  return {
    print: (value, text) => ctx.print(value, text),
    warn: stderr,
    setExitCode: (code) => ctx.setExitCode(code),
  };
}
