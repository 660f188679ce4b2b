/**
 * Core's own `raw` file format: the file is the disk, byte for byte. A new file is made sparse
 * (truncated to its size), and the copier writes only the blocks that hold data, so an exported
 * raw file keeps the volume's holes. Node cannot ask the file system where a file's holes are
 * (lseek SEEK_DATA): this device reports the whole file as data. The qcow2 plugin binds a `raw`
 * of its own (its engine's, which knows the holes through its native helper); when it is loaded,
 * that one is used.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { AlreadyExists, FailedPrecondition, InternalError, InvalidArgument, NotFound, OffloadError, OutOfRange, PermissionDenied } from '../model/errors.js';
import type { BlockDevice } from './block-device.js';
import type { FileFormat } from './file-format.js';

/** Zeros written at a time where a range must read as zeros. */
const ZERO_CHUNK = 1024 * 1024;

/** A typed error for a failed file operation. */
export function fileError(e: unknown, path: string, what: string): OffloadError {
  if (e instanceof OffloadError) return e;
  const code = (e as NodeJS.ErrnoException)?.code;
  const details = { ref: path, cause: e };
  if (code === 'ENOENT') return new NotFound(`${path}: no such file or folder (${what})`, details);
  if (code === 'EEXIST') return new AlreadyExists(`${path} already exists`, { ...details, hint: 'choose another file, or replace it with --force' });
  if (code === 'EACCES' || code === 'EPERM' || code === 'EROFS') return new PermissionDenied(`${path}: permission denied (${what})`, details);
  if (code === 'EISDIR') return new InvalidArgument(`${path} is a directory`, { ...details, hint: 'name a file' });
  if (code === 'ENOSPC' || code === 'EDQUOT') return new FailedPrecondition(`${path}: no space left (${what})`, { ...details, hint: 'free space on its file system, or write elsewhere' });
  return new InternalError(`${path}: cannot ${what}: ${(e as Error)?.message ?? String(e)}`, details);
}

/** `raw` as core knows it: a plain file, sparse where the copier leaves blocks of zeros out. */
export const rawFileFormat: FileFormat = {
  name: 'raw',
  description: 'raw disk image: the file is the disk, byte for byte (sparse where it has no data)',
  async create(path, sizeBytes, opts = {}) {
    let fh: FileHandle | undefined;
    try {
      fh = await open(path, opts.overwrite ? 'w+' : 'wx+');
      await fh.truncate(sizeBytes);
    } catch (e) {
      await fh?.close();
      throw fileError(e, path, 'create');
    }
    return rawDevice(path, fh, 'rw', sizeBytes);
  },
  async open(path, mode) {
    let fh: FileHandle | undefined;
    try {
      fh = await open(path, mode === 'r' ? 'r' : 'r+');
      const st = await fh.stat();
      if (st.isDirectory()) throw Object.assign(new Error('is a directory'), { code: 'EISDIR' });
      if (!st.isFile()) throw new InvalidArgument(`${path} is not a regular file`, { ref: path, hint: 'name an image file (block devices and pipes are not supported)' });
      return rawDevice(path, fh, mode, st.size);
    } catch (e) {
      await fh?.close();
      throw fileError(e, path, mode === 'r' ? 'open' : 'open for writing');
    }
  },
};

/** A BlockDevice over an open file of `size` bytes (reads past its end are zeros). */
function rawDevice(path: string, fh: FileHandle, mode: 'r' | 'rw', size: number): BlockDevice {
  let closed = false;
  const check = (offset: number, length: number, what: string, write: boolean) => {
    if (closed) throw new FailedPrecondition(`${path} is closed`, { ref: path });
    if (write && mode !== 'rw') throw new FailedPrecondition(`${path} is open read-only`, { ref: path });
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
      throw new OutOfRange(`${what} at ${offset}+${length} is outside ${path} (${size} bytes)`, { ref: path });
    }
  };
  const writeAll = async (offset: number, data: Uint8Array) => {
    for (let done = 0; done < data.length;) {
      const { bytesWritten } = await fh.write(data, done, data.length - done, offset + done).catch((e: unknown) => { throw fileError(e, path, 'write'); });
      done += bytesWritten;
    }
  };
  return {
    sizeBytes: size,
    blockSize: 512,
    async read(offset, length) {
      check(offset, length, 'read', false);
      const buf = new Uint8Array(length);
      for (let done = 0; done < length;) {
        const { bytesRead } = await fh.read(buf, done, length - done, offset + done).catch((e: unknown) => { throw fileError(e, path, 'read'); });
        if (bytesRead === 0) break; // shorter than its size: the rest reads as zeros
        done += bytesRead;
      }
      return buf;
    },
    async write(offset, data) {
      check(offset, data.length, 'write', true);
      await writeAll(offset, data);
    },
    async writeZeroes(offset, length) {
      check(offset, length, 'write zeroes', true);
      // No hole punching from Node: zeros are written (a new file never needs this, its holes read as zeros).
      const zeros = new Uint8Array(Math.min(length, ZERO_CHUNK));
      for (let p = offset; p < offset + length; p += ZERO_CHUNK) await writeAll(p, zeros.subarray(0, Math.min(ZERO_CHUNK, offset + length - p)));
    },
    async extents(offset = 0, length = size - offset) {
      check(offset, length, 'extents', false);
      return length > 0 ? [{ offset, length, kind: 'data' }] : [];
    },
    async flush() {
      if (closed) throw new FailedPrecondition(`${path} is closed`, { ref: path });
      if (mode === 'rw') await fh.datasync().catch((e: unknown) => { throw fileError(e, path, 'flush'); });
    },
    async close() {
      if (closed) return;
      closed = true;
      try {
        if (mode === 'rw') await fh.datasync();
      } finally {
        await fh.close();
      }
    },
  };
}
