import { Unsupported } from '../../../core/index.js';
import type { CreateOptions } from './types.js';

export async function createImage(path: string, _opts: CreateOptions = {}): Promise<void> {
  throw new Unsupported(`createImage ${path}: not yet implemented`);
}
