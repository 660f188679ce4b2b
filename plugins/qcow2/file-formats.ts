/**
 * The image file formats this plugin gives `volume export|import`: `qcow2`, and a `raw` over the
 * engine's raw image, which replaces core's: it knows a raw file's holes (SEEK_DATA through the
 * native helper), and between engine images the copier's native fast path moves the data.
 */
import { existsSync, realpathSync } from 'node:fs';
import { dirname, join } from 'node:path';
import {
  AlreadyExists, InvalidArgument, isOffloadError, type BlockDevice, type FileFormat,
} from '../../core/index.js';
import { createImage, imageDevice, openImage, probeFormat, type ImageFormat } from './engine/index.js';
import { METADATA_FILE } from './pool/metadata.js';

/** An engine image as a device; the image is closed with it. */
async function open(path: string, format: ImageFormat, mode: 'r' | 'rw'): Promise<BlockDevice> {
  // Read: the guest content, backing chain included (as qemu-img convert reads it). Write: a file
  // this format made, alone; its metadata is written at each flush (the job flushes before every
  // checkpoint it saves) rather than with every cluster.
  const img = await openImage(path, mode === 'r' ? { format } : { format, readOnly: false, noBacking: true, deferMetadata: true });
  try {
    return await imageDevice(img, { mode, ref: path, onClose: (o) => img.close(o) });
  } catch (e) {
    await img.close();
    throw e;
  }
}

/** New images are never made inside a local pool's folder: the pool owns its files (and one of them may be the source). */
async function checkCreate(path: string): Promise<void> {
  const dir = dirname(path);
  if (existsSync(join(dir, METADATA_FILE)) || existsSync(join(realFolder(dir), METADATA_FILE))) {
    throw new InvalidArgument(`${path} lies in the folder of a local pool, whose files belong to the pool`, {
      ref: path, hint: `write the image outside ${dir}`,
    });
  }
}

async function create(path: string, format: ImageFormat, sizeBytes: number, overwrite: boolean): Promise<BlockDevice> {
  await checkCreate(path);
  try {
    await createImage(path, { format, size: sizeBytes, overwrite });
  } catch (e) {
    // The engine calls an existing file a failed precondition; to an export it is a name taken.
    if (isOffloadError(e, 'FailedPrecondition') && (e.cause as NodeJS.ErrnoException | undefined)?.code === 'EEXIST') {
      throw new AlreadyExists(`${path} already exists`, { ref: path, hint: 'choose another file, or replace it with --force' });
    }
    throw e;
  }
  return open(path, format, 'rw');
}

function realFolder(dir: string): string {
  try {
    return realpathSync(dir);
  } catch {
    return dir;
  }
}

/** qcow2 files (v3, 64 KiB clusters, as `qemu-img create` makes them): only clusters with data are allocated. */
export const qcow2FileFormat: FileFormat = {
  name: 'qcow2',
  description: 'qcow2 image (QEMU): only the clusters that hold data are allocated',
  probe: async (path) => (await probeFormat(path)) === 'qcow2',
  checkCreate,
  create: (path, sizeBytes, opts = {}) => create(path, 'qcow2', sizeBytes, opts.overwrite === true),
  open: (path, mode) => open(path, 'qcow2', mode),
};

/** Raw files through the engine: sparse, with their holes known where the native helper is built. */
export const engineRawFormat: FileFormat = {
  name: 'raw',
  description: 'raw disk image: the file is the disk, byte for byte (sparse where it has no data)',
  checkCreate,
  create: (path, sizeBytes, opts = {}) => create(path, 'raw', sizeBytes, opts.overwrite === true),
  open: (path, mode) => open(path, 'raw', mode),
};
