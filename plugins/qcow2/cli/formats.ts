/** Format names accepted by `-f`, `-F`, `-O` (the engine knows qcow2 and raw). */
import { InvalidArgument } from '../../../core/index.js';
import type { ImageFormat } from '../engine/index.js';

export function parseFormat(name: string | undefined): ImageFormat | undefined {
  if (name === undefined) return undefined;
  if (name === 'qcow2' || name === 'raw') return name;
  throw new InvalidArgument(`Unknown file format '${name}'`, { hint: 'offload img supports the formats qcow2 and raw' });
}
