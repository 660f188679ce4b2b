import { Unsupported } from '../../../core/index.js';
import type { Image, ImageFormat, OpenOptions } from './types.js';

export async function openImage(path: string, _opts: OpenOptions = {}): Promise<Image> {
  throw new Unsupported(`openImage ${path}: not yet implemented`);
}

export async function probeFormat(path: string): Promise<ImageFormat> {
  throw new Unsupported(`probeFormat ${path}: not yet implemented`);
}
