/**
 * Finding layers of an open chain by the names users give (`--base`, `-b`), and the name to
 * store when an image is re-pointed at a layer further down.
 */
import { dirname, isAbsolute, join, relative, resolve } from 'node:path';
import { FailedPrecondition, InvalidArgument, NotFound, Unsupported } from '../../../core/index.js';
import { openImage, type Image, type ImageFormat } from '../engine/index.js';

/** The open layers of a chain, top first (image, image.backing, …). */
export function layersOf(image: Image): Image[] {
  const out: Image[] = [];
  for (let l: Image | undefined = image; l; l = l.backing) out.push(l);
  return out;
}

/**
 * Index in the chain (0 = image) of the layer called `name`: by resolved path, by the name the
 * layer above stores, or relative to the image's folder. NotFound when none matches.
 */
export function findLayer(image: Image, name: string, what: string): number {
  const layers = layersOf(image);
  const candidates = new Set([resolve(name), resolve(dirname(image.path), name)]);
  for (let i = 0; i < layers.length; i++) {
    const entry = image.chain[i];
    if (candidates.has(resolve(layers[i]!.path))) return i;
    if (i > 0 && image.chain[i - 1]?.backingFilename === name) return i;
    if (entry && candidates.has(resolve(entry.filename))) return i;
  }
  throw new NotFound(`Did not find '${name}' in the backing chain of '${image.path}' (looking for the ${what})`, {
    ref: image.path,
    hint: `the chain is ${image.chain.map((c) => c.filename).join(' → ')}; name one of its images`,
  });
}

/** The backing name to store in `image` so that it resolves to `target` (kept relative when it can be). */
export function backingNameFor(image: Image, layerAbove: Image | undefined, target: Image, storedAbove: string | undefined): string {
  if (storedAbove !== undefined && layerAbove !== undefined) {
    if (isAbsolute(storedAbove)) return storedAbove;
    if (resolve(dirname(layerAbove.path)) === resolve(dirname(image.path))) return storedAbove;
  }
  const rel = relative(dirname(resolve(image.path)), resolve(target.path));
  return rel === '' ? target.path : rel;
}

/** A job that changes an image's metadata (allocation, backing file) needs a qcow2 image. */
export function assertQcow2(image: Image, job: string): void {
  if (image.format !== 'qcow2') {
    throw new Unsupported(`${job} ${image.path}: the image is ${image.format}; ${job} needs a qcow2 image`, {
      ref: image.path, hint: 'convert it to qcow2 first (`offload img convert -O qcow2`)',
    });
  }
}

/** Open the backing `name` of `img` read-only (relative to the image's folder), as the chain would. */
export async function openBackingOf(img: Image, name: string, format: ImageFormat | undefined): Promise<Image> {
  const full = isAbsolute(name) ? name : join(dirname(img.path), name);
  return openImage(full, { readOnly: true, ...(format ? { format } : {}) });
}

export function assertWritable(image: Image, job: string): void {
  if (image.readOnly) {
    throw new FailedPrecondition(`${job} ${image.path}: the image is open read-only`, {
      ref: image.path, hint: 'open it read-write (openImage(path, { readOnly: false }))',
    });
  }
}

export function assertAbove(image: Image, topIndex: number, baseIndex: number): void {
  if (baseIndex <= topIndex) {
    throw new InvalidArgument(`${image.path}: base ${image.chain[baseIndex]?.filename} must lie below top ${image.chain[topIndex]?.filename} in the chain`, {
      ref: image.path, hint: 'name a backing file further down the chain as base',
    });
  }
}
