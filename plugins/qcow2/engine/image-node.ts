import type { ImageFile } from './file.js';
import type { Allocation, BlockStatus, Image } from './types.js';

/**
 * What each format's driver implements for one open layer (Qcow2Image, RawImage), QEMU's
 * BlockDriverState to ImageHandle's BlockBackend: the handle that users hold adds write
 * tracking and the pivot, and computes allocation above a base from the nodes' own.
 */
export interface ImageNode extends Omit<Image, 'trackWrites' | 'pivot' | 'allocatedAbove'> {
  /** The file holding the layer (the native copy reads and writes it directly). */
  readonly file: ImageFile;
  /** This layer's own allocations in [offset, offset+length) (allocatedAbove with base = its backing). */
  ownAllocations(offset: number, length: number): Promise<Allocation[]>;
  /**
   * Native copy into this layer (see copy-in.ts and RawImage); absent where it cannot take one.
   * `until`: ImageFile.copyIn's (nothing written past it; LeaseLost).
   */
  copyFromFile?(src: ImageFile, ops: Float64Array, until?: Float64Array): Promise<void>;
  /** The file system's own allocation map (raw files), undefined when it cannot be known cheaply. */
  exactBlockStatus?(offset?: number, length?: number): Promise<BlockStatus[] | undefined>;
}
