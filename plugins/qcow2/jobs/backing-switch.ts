/**
 * The last step of stream, intermediate commit and rebase: point an open image at a new backing
 * file, on disk and in memory. Everything the new reference depends on must already be on disk:
 * we flush the image first, then rewrite the header cluster in one write (every field that
 * decides the backing — offsets, name, format extension — lies in its first bytes, one page, so
 * a kill leaves the old header or the new one, never a mix), then flush again.
 */
import { dirname, isAbsolute, join } from 'node:path';
import { setBackingFormat } from '../format/header.js';
import { openImage } from '../engine/open.js';
import type { Qcow2Image } from '../engine/qcow2-image.js';
import type { ChainEntry, Image, ImageFormat } from '../engine/types.js';

export interface NewBacking {
  /** Name stored in the header; undefined = no backing file. */
  name: string | undefined;
  format?: string | undefined;
  /** The new backing image, already open read-only (the image takes ownership). */
  image?: Image | undefined;
}

/** Open the backing `name` of `img` read-only (relative to the image's folder), as the chain would. */
export async function openBackingOf(img: Image, name: string, format: ImageFormat | undefined): Promise<Image> {
  const full = isAbsolute(name) ? name : join(dirname(img.path), name);
  return openImage(full, { readOnly: true, ...(format ? { format } : {}) });
}

/**
 * Rewrite the backing reference of `img` and switch its open chain; closes the old chain.
 * `writer` is a read-write handle on the same file when `img` itself is open read-only (an
 * intermediate layer of a chain); the header is written through it.
 */
export async function switchBacking(img: Qcow2Image, next: NewBacking, writer: Qcow2Image = img): Promise<void> {
  await img.lock.exclusive(async () => {
    // The data the job copied is referenced and durable before the header drops the old backing.
    if (writer !== img) await writer.flushMetadata();
    await img.flushMetadataLocked();
    await writer.file.sync();
    for (const target of new Set([img, writer])) {
      target.h.backingFile = next.name;
      setBackingFormat(target.h, next.name === undefined ? undefined : next.format);
    }
    await writer.writeHeader();
    await writer.file.sync();

    const old = img.backing;
    const mutable = img as unknown as { backing: Image | undefined };
    mutable.backing = next.image;
    // The entry object is shared by the chain arrays of the layers above: update it in place.
    const top = img.chain[0]!;
    delete top.backingFilename;
    delete top.fullBackingFilename;
    delete top.backingFormat;
    if (next.name !== undefined) {
      top.backingFilename = next.name;
      top.fullBackingFilename = isAbsolute(next.name) ? next.name : join(dirname(img.path), next.name);
      if (next.format !== undefined) top.backingFormat = next.format;
    }
    if (old && old !== next.image) await old.close();
  });
}

/** Rebuild every layer's `chain` array (top first) after a layer below was re-pointed. */
export function relinkChains(image: Image): void {
  const layers: Image[] = [];
  for (let l: Image | undefined = image; l; l = l.backing) layers.push(l);
  for (let i = layers.length - 1; i >= 0; i--) {
    const l = layers[i]!;
    const own: ChainEntry = l.chain[0]!;
    l.chain.splice(0, l.chain.length, own, ...(l.backing?.chain ?? []));
  }
}
