import type { BlockDevice } from './block-device.js';

/**
 * A disk-image file format that `volume export` writes and `volume import` reads (`raw`,
 * `qcow2`, …). Core provides `raw` itself (a plain file); a plugin's ContainerModule binds more to
 * the `FileFormat` token (multi-injection), and a plugin's format of a name core has (`raw`)
 * replaces core's.
 *
 * Paths reaching a format are absolute. Errors are the core's typed errors: NotFound (no such
 * file), AlreadyExists (create without overwrite over an existing file), PermissionDenied,
 * Corrupt (a damaged image), Unsupported (a feature the format refuses).
 */
export interface FileFormat {
  /** Its name, as `-O`/`-f` take it: `raw`, `qcow2`. */
  readonly name: string;
  /** One line for help texts and errors. */
  readonly description: string;
  /**
   * Does the file look like one of this format's (its magic)? Absent for a format that nothing
   * marks (raw): a file no format claims is raw.
   */
  probe?(path: string): Promise<boolean>;
  /** Refuse, before a job starts, a path where this format will not create an image (a typed error); create() checks again. */
  checkCreate?(path: string): Promise<void>;
  /**
   * Create an image of `sizeBytes` that reads as zeros and allocates nothing yet, and open it for
   * writing. An existing file is AlreadyExists unless `overwrite` (then it is replaced).
   */
  create(path: string, sizeBytes: number, opts?: { overwrite?: boolean }): Promise<BlockDevice>;
  /** Open an existing image: `r` for its guest content (backing chain included), `rw` to go on writing one this format created. */
  open(path: string, mode: 'r' | 'rw'): Promise<BlockDevice>;
}
export const FileFormat = Symbol.for('offload/FileFormat');
