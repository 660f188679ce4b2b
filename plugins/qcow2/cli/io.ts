/** `offload img io [-f fmt] [-r] -c CMD … file`: qemu-io's -c commands on one image. */
import { openImage, type ImageFormat } from '../engine/index.js';
import type { ImgOutput } from './output.js';
import { runIoCommand } from './qemu-io-commands.js';

export interface IoArgs {
  file: string;
  commands: string[];
  format?: ImageFormat;
  readOnly?: boolean;
}

export async function runIo(args: IoArgs, out: ImgOutput): Promise<void> {
  const img = await openImage(args.file, { readOnly: args.readOnly ?? false, deferMetadata: true, ...(args.format ? { format: args.format } : {}) });
  let failed = false;
  try {
    const sink = { out: (line: string) => out.print(line, line), err: (line: string) => out.warn(line) };
    for (const cmd of args.commands) {
      if (!(await runIoCommand(img, cmd, sink))) failed = true;
    }
    if (!img.readOnly) await img.flush();
  } finally {
    await img.close();
  }
  if (failed) out.setExitCode(1);
}
