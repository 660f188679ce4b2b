/**
 * `-o` creation options as qemu-img reads them: `key=value` pairs separated by commas, `,,` an
 * escaped comma, several `-o` accumulating. Only the options our formats know are accepted.
 */
import { InvalidArgument, Unsupported } from '../../../core/index.js';
import type { CreateOptions, ImageFormat } from '../engine/index.js';
import { parseQemuSizeBig } from './sizes.js';

/** Split `a=1,b=x,,y` into [['a','1'],['b','x,y']]. */
export function splitOptions(text: string): [string, string][] {
  const out: [string, string][] = [];
  let cur = '';
  const parts: string[] = [];
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === ',' && text[i + 1] === ',') {
      cur += ',';
      i++;
    } else if (c === ',') {
      parts.push(cur);
      cur = '';
    } else {
      cur += c;
    }
  }
  parts.push(cur);
  for (const p of parts) {
    if (p === '') continue;
    const eq = p.indexOf('=');
    if (eq < 0) throw new InvalidArgument(`Invalid parameter '${p}'`, { hint: 'creation options are key=value pairs, e.g. -o cluster_size=64k' });
    out.push([p.slice(0, eq), p.slice(eq + 1)]);
  }
  return out;
}

/** The options of `create`/`convert -O` after parsing, with the text the user gave for each. */
export interface CreationOptions
  extends Pick<CreateOptions, 'clusterSize' | 'compat' | 'lazyRefcounts' | 'refcountBits' | 'backingFile' | 'backingFormat' | 'size' | 'compressionType'> {
  /** What the user wrote for each option, for the "Formatting …" line. */
  given: Map<string, string>;
}

const QCOW2_KEYS = ['size', 'compat', 'backing_file', 'backing_fmt', 'cluster_size', 'lazy_refcounts', 'refcount_bits', 'extended_l2', 'compression_type', 'preallocation'];
const RAW_KEYS = ['size', 'preallocation'];

export function parseCreationOptions(format: ImageFormat, pairs: readonly [string, string][]): CreationOptions {
  const known = format === 'qcow2' ? QCOW2_KEYS : RAW_KEYS;
  const out: CreationOptions = { given: new Map() };
  for (const [key, value] of pairs) {
    if (!known.includes(key)) throw new InvalidArgument(`Invalid parameter '${key}'`, { hint: `${format} accepts: ${known.join(', ')}` });
    out.given.set(key, value);
    switch (key) {
      case 'size':
        out.size = sizeOption(key, value);
        break;
      case 'cluster_size':
        out.clusterSize = sizeOption(key, value);
        break;
      case 'refcount_bits':
        out.refcountBits = numberOption(key, value);
        break;
      case 'compat':
        if (value === '0.10' || value === 'v2') out.compat = '0.10';
        else if (value === '1.1' || value === 'v3') out.compat = '1.1';
        else throw new InvalidArgument(`Parameter 'version' does not accept value '${value}'`, { hint: 'use compat=0.10 or compat=1.1' });
        break;
      case 'lazy_refcounts':
        out.lazyRefcounts = boolOption(key, value);
        break;
      case 'backing_file':
        out.backingFile = value;
        break;
      case 'backing_fmt':
        if (value !== 'qcow2' && value !== 'raw') throw new Unsupported(`Unknown backing file format '${value}'`, { hint: 'backing files may be qcow2 or raw' });
        out.backingFormat = value;
        break;
      case 'extended_l2':
        if (boolOption(key, value)) throw new Unsupported('extended_l2=on is not supported', { hint: 'create the image with extended_l2=off' });
        break;
      case 'compression_type':
        if (value !== 'zlib' && value !== 'zstd') throw new InvalidArgument(`Parameter 'compression-type' does not accept value '${value}'`, { hint: 'use compression_type=zlib or compression_type=zstd' });
        out.compressionType = value;
        break;
      case 'preallocation':
        if (value !== 'off') throw new Unsupported(`preallocation=${value} is not supported`, { hint: 'only preallocation=off is supported' });
        break;
    }
  }
  return out;
}

function sizeOption(key: string, value: string): number {
  const v = parseQemuSizeBig(value);
  if (v === undefined || v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new InvalidArgument(`Parameter '${key}' expects a non-negative number below 2^64`, {
      hint: 'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, respectively',
    });
  }
  return Number(v);
}

function numberOption(key: string, value: string): number {
  if (!/^[0-9]+$/.test(value)) throw new InvalidArgument(`Parameter '${key}' expects a number`);
  return Number(value);
}

function boolOption(key: string, value: string): boolean {
  if (['on', 'yes', 'true', 'y'].includes(value)) return true;
  if (['off', 'no', 'false', 'n'].includes(value)) return false;
  throw new InvalidArgument(`Parameter '${key}' expects 'on' or 'off'`);
}

/** Check the combination before anything is written (qemu-img's wording). */
export function validateQcow2Options(o: CreationOptions): void {
  const cs = o.clusterSize;
  if (cs !== undefined && (cs < 512 || cs > 2 * 1024 * 1024 || (cs & (cs - 1)) !== 0)) {
    throw new InvalidArgument('Cluster size must be a power of two between 512 and 2048k');
  }
  const rb = o.refcountBits;
  if (rb !== undefined && (rb < 1 || rb > 64 || (rb & (rb - 1)) !== 0)) {
    throw new InvalidArgument('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (o.compat === '0.10') {
    if (o.lazyRefcounts) {
      throw new InvalidArgument('Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)');
    }
    if (rb !== undefined && rb !== 16) {
      throw new InvalidArgument('Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)');
    }
  }
}
