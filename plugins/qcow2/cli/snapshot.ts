/** `qemu-img snapshot -l | -c NAME | -a NAME | -d NAME file`. */
import { Unsupported } from '../../../core/index.js';
import { openImage, type ImageFormat } from '../engine/index.js';
import { humanSnapshotList, snapshotJson } from './image-info.js';
import type { ImgOutput } from './output.js';

export type SnapshotAction = { kind: 'list' } | { kind: 'create' | 'apply' | 'delete'; name: string };

export async function runSnapshot(file: string, action: SnapshotAction, format: ImageFormat | undefined, out: ImgOutput): Promise<void> {
  const img = await openImage(file, { readOnly: action.kind === 'list', noBacking: true, ...(format ? { format } : {}) });
  try {
    if (img.format !== 'qcow2') {
      // qemu-img lists nothing for a format without snapshots, and refuses to change them.
      if (action.kind === 'list') return;
      throw new Unsupported(`${file}: the ${img.format} format has no internal snapshots`, {
        hint: 'convert the image to qcow2 first',
      });
    }
    switch (action.kind) {
      case 'list': {
        const snaps = (await img.snapshots.list()).map(snapshotJson);
        if (snaps.length > 0) out.print(snaps, humanSnapshotList(snaps).join('\n'));
        break;
      }
      case 'create':
        await img.snapshots.create(action.name);
        break;
      case 'apply':
        await img.snapshots.apply(action.name);
        break;
      case 'delete':
        await img.snapshots.delete(action.name);
        break;
    }
    if (action.kind !== 'list') await img.flush();
  } finally {
    await img.close();
  }
}
