/**
 * A volume's data path: a core BlockDevice over the volume's shared open image. Each call goes
 * to whatever the active layer is at that moment, so a device stays valid across snapshots
 * and reverts (like a VM's disk across libvirt's external snapshots).
 */
import { FailedPrecondition, OutOfRange, type BlockDevice, type Extent } from '../../../core/index.js';
import type { OpenVolume } from './open-volumes.js';

export function volumeDevice(ov: OpenVolume, ref: string, mode: 'r' | 'rw', sizeNow: number, blockSize: number,
  onClose: () => Promise<void>): BlockDevice {
  let closed = false;
  let size = sizeNow;
  const alive = () => {
    if (closed) throw new FailedPrecondition(`the device of ${ref} is closed`, { ref, hint: 'open the volume again' });
  };
  const range = (offset: number, length: number, what: string) => {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
      throw new OutOfRange(`${what} at ${offset}+${length} is outside ${ref} (${size} bytes)`, { ref });
    }
  };
  const writable = () => {
    if (mode !== 'rw') throw new FailedPrecondition(`${ref} is open read-only`, { ref, hint: 'open it with mode "rw" to write' });
  };
  // Every call re-reads the size: a resize or revert through the backend changes it.
  const io = <T>(fn: (img: Awaited<ReturnType<OpenVolume['current']>>) => Promise<T>) =>
    ov.lock.shared(async () => {
      const img = await ov.current();
      size = img.virtualSize;
      return fn(img);
    });
  return {
    get sizeBytes() { return size; },
    blockSize,
    async read(offset, length) {
      alive();
      return io(async (img) => { range(offset, length, 'read'); return img.read(offset, length); });
    },
    async write(offset, data) {
      alive();
      writable();
      return io(async (img) => { range(offset, data.length, 'write'); await img.write(offset, data); });
    },
    async writeZeroes(offset, length) {
      alive();
      writable();
      return io(async (img) => { range(offset, length, 'write zeroes'); await img.writeZeroes(offset, length); });
    },
    async extents(offset = 0, length?: number) {
      alive();
      return io(async (img) => {
        const len = length ?? size - offset;
        range(offset, len, 'extents');
        const out: Extent[] = [];
        if (len === 0) return out;
        for (const s of await img.blockStatus(offset, len)) {
          if (!s.present) continue;
          const kind = s.data ? 'data' : 'zero';
          const last = out[out.length - 1];
          if (last && last.kind === kind && last.offset + last.length === s.start) last.length += s.length;
          else out.push({ offset: s.start, length: s.length, kind });
        }
        return out;
      });
    },
    async flush() {
      alive();
      if (mode === 'rw') await io((img) => img.flush());
    },
    async close() {
      if (closed) return;
      closed = true;
      if (mode === 'rw' && !ov.deleted && ov.isOpen) await io((img) => img.flush()).catch(() => undefined);
      await onClose();
    },
  };
}
