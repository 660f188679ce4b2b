/** `qemu-img resize [-f fmt] [--shrink] file [+|-]size`. */
import { InvalidArgument, OutOfRange } from '../../../core/index.js';
import { openImage, type ImageFormat } from '../engine/index.js';
import type { ImgOutput } from './output.js';
import { parseImageSize } from './sizes.js';

export interface ResizeArgs {
  file: string;
  size: string;
  format?: ImageFormat;
  shrink?: boolean;
  quiet?: boolean;
}

export async function runResize(args: ResizeArgs, out: ImgOutput): Promise<void> {
  const sign = args.size.startsWith('+') ? 1 : args.size.startsWith('-') ? -1 : 0;
  const amount = parseImageSize(sign === 0 ? args.size : args.size.slice(1));
  const img = await openImage(args.file, { readOnly: false, noBacking: true, ...(args.format ? { format: args.format } : {}) });
  try {
    const newSize = sign === 0 ? amount : img.virtualSize + sign * amount;
    if (newSize <= 0) throw new InvalidArgument('New image size must be positive', { ref: args.file });
    if (newSize < img.virtualSize) {
      if (!args.shrink) {
        throw new OutOfRange('Use the --shrink option to perform a shrink operation.', {
          ref: args.file,
          hint: `${args.file} is ${img.virtualSize} bytes; shrinking deletes all data past the new end`,
        });
      }
      out.warn(
        "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.",
      );
    }
    if (newSize !== img.virtualSize) await img.resize(newSize);
    await img.flush();
  } finally {
    await img.close();
  }
  if (!args.quiet) out.print({ resized: true }, 'Image resized.');
}
