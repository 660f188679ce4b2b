/**
 * `qemu-img map`: the allocation map of an image and its backing chain. JSON is printed by hand as
 * qemu-img 7.2's `dump_map_entry` does (no `compressed` member: that arrived in 8.2); the human
 * form lists only the ranges whose data lives in a file, and refuses compressed data.
 */
import { Unsupported } from '../../../core/index.js';
import { openImage, type BlockStatus, type Image, type ImageFormat } from '../engine/index.js';
import { pathCombine } from './names.js';
import type { ImgOutput } from './output.js';

export interface MapArgs {
  file: string;
  format?: ImageFormat;
  output: 'human' | 'json';
  /** --start-offset / --max-length: map only this part of the image. */
  startOffset?: number;
  maxLength?: number;
}

/** One line of `qemu-img map` 7.2: a BlockStatus without `compressed` (7.2 does not print it); `filename` is qemu's name of the file at `depth`. */
export type MapEntry = Omit<BlockStatus, 'compressed'>;

export async function runMap(args: MapArgs, out: ImgOutput): Promise<void> {
  const img = await openImage(args.file, { readOnly: true, ...(args.format ? { format: args.format } : {}) });
  let entries: MapEntry[];
  try {
    const start = args.startOffset ?? 0;
    const end = Math.min(img.virtualSize, args.maxLength === undefined ? Infinity : start + args.maxLength);
    entries =
      end > start
        ? mapEntries(await img.blockStatus(start, end - start), layerNames(args.file, img))
        : // qemu-img prints its empty, zero-length entry when the range is empty.
          [{ start, length: 0, depth: 0, present: false, zero: false, data: false }];
  } finally {
    await img.close();
  }
  if (args.output === 'json') {
    out.print(entries.map(jsonShape), mapJson(entries));
  } else {
    out.print(entries.filter((e) => e.data && !e.zero).map(jsonShape), mapHuman(entries));
  }
}

/** qemu's name of every layer, top first. */
export function layerNames(file: string, img: Image): string[] {
  const names = [file];
  let layer: Image | undefined = img;
  while (layer?.backing) {
    const stored = layer.header?.backingFile;
    names.push(stored !== undefined ? pathCombine(names[names.length - 1]!, stored) : layer.backing.path);
    layer = layer.backing;
  }
  return names;
}

/**
 * The engine's ranges, merged by qemu-img 7.2's rule: adjacent, same depth/present/zero/data,
 * same file, and offsets either both absent or contiguous.
 */
export function mapEntries(status: readonly BlockStatus[], names: readonly string[]): MapEntry[] {
  const out: MapEntry[] = [];
  for (const s of status) {
    if (s.length === 0) continue;
    const e: MapEntry = { start: s.start, length: s.length, depth: s.depth, present: s.present, zero: s.zero, data: s.data };
    if (s.offset !== undefined) e.offset = s.offset;
    // qemu names the file only when it can say where in it the data is.
    if (s.offset !== undefined && names[s.depth] !== undefined) e.filename = names[s.depth]!;
    const prev = out[out.length - 1];
    if (prev && canMerge(prev, e)) {
      prev.length += e.length;
    } else {
      out.push(e);
    }
  }
  return out;
}

function canMerge(a: MapEntry, b: MapEntry): boolean {
  return (
    a.start + a.length === b.start &&
    a.depth === b.depth &&
    a.present === b.present &&
    a.zero === b.zero &&
    a.data === b.data &&
    a.filename === b.filename &&
    (a.offset === undefined) === (b.offset === undefined) &&
    (a.offset === undefined || a.offset + a.length === b.offset)
  );
}

function jsonShape(e: MapEntry): Record<string, unknown> {
  const { filename: _f, ...rest } = e;
  return rest;
}

/** `qemu-img map --output=json` text (without the final newline). */
export function mapJson(entries: readonly MapEntry[]): string {
  const items = entries.map(
    (e) =>
      `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, ` +
      `"zero": ${e.zero}, "data": ${e.data}${e.offset !== undefined ? `, "offset": ${e.offset}` : ''}}`,
  );
  return '[' + items.join(',\n') + ']';
}

/** `qemu-img map` human text (without the final newline). */
export function mapHuman(entries: readonly MapEntry[]): string {
  const lines = [`${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File`];
  for (const e of entries) {
    if (e.data && e.offset === undefined) {
      throw new Unsupported('File contains external, encrypted or compressed clusters.', {
        hint: 'use --output=json to see the map of such an image',
      });
    }
    if (e.data && !e.zero) {
      lines.push(`${hex(e.start).padEnd(16)}${hex(e.length).padEnd(16)}${hex(e.offset ?? 0).padEnd(16)}${e.filename ?? ''}`);
    }
  }
  return lines.join('\n');
}

/** printf("%#x"): "0" for zero, "0x…" otherwise. */
function hex(n: number): string {
  return n === 0 ? '0' : '0x' + n.toString(16);
}
