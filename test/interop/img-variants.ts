/**
 * The image variants of the interop tests (issue 3 §7): each is a list of steps written in
 * qemu-img/qemu-io syntax, run either by qemu's tools or by `offload img`, and the patterns that
 * must read back afterwards.
 */
import { expect } from 'vitest';
import { runImg } from './img-cli.js';
import { run } from './img-qemu.js';

export type Step =
  | { tool: 'img'; args: string[] } // a qemu-img subcommand (create, snapshot, …)
  | { tool: 'io'; file: string; format?: 'raw' | 'qcow2'; cmds: string[] }
  /** qemu-img convert -c: qemu only (we do not write compressed clusters). */
  | { tool: 'compress'; from: string; to: string };

export interface PatternRead {
  pattern: string;
  offset: number;
  length: number;
}

export interface Variant {
  name: string;
  /** The image the checks look at (the top of a chain). */
  file: string;
  steps: Step[];
  reads: PatternRead[];
  /** Internal snapshots the steps take, with what the image read like when each was taken. */
  snapshots?: { name: string; reads: PatternRead[] }[];
}

const K = 1024;
const M = 1024 * K;

const WRITES = ['write -P 0x11 0 3k', 'write -P 0x22 70k 130k', 'write -z 300k 64k', 'write -P 0x33 1M 1k', 'write -P 0x44 5M 1M'];
const READS: PatternRead[] = [
  { pattern: '0x11', offset: 0, length: 3 * K },
  { pattern: '0', offset: 3 * K, length: 67 * K },
  { pattern: '0x22', offset: 70 * K, length: 130 * K },
  { pattern: '0', offset: 300 * K, length: 64 * K },
  { pattern: '0x33', offset: M, length: K },
  { pattern: '0', offset: 2 * M, length: 3 * M },
  { pattern: '0x44', offset: 5 * M, length: M },
];

function plain(name: string, options: string[], size = '8M'): Variant {
  const file = `${name}.qcow2`;
  return {
    name,
    file,
    steps: [
      { tool: 'img', args: ['create', '-f', 'qcow2', ...(options.length ? ['-o', options.join(',')] : []), file, size] },
      { tool: 'io', file, cmds: WRITES },
    ],
    reads: READS,
  };
}

export const VARIANTS: Variant[] = [
  plain('v2', ['compat=0.10']),
  plain('v3', ['compat=1.1']),
  plain('cs512', ['cluster_size=512']),
  plain('cs4k', ['cluster_size=4k']),
  plain('cs64k', ['cluster_size=64k']),
  plain('cs2M', ['cluster_size=2M'], '16M'),
  plain('rc1', ['refcount_bits=1']),
  plain('rc16', ['refcount_bits=16']),
  plain('rc64', ['refcount_bits=64']),
  plain('lazy', ['lazy_refcounts=on']),
  {
    name: 'compressed',
    file: 'compressed.qcow2',
    steps: [
      { tool: 'img', args: ['create', '-f', 'raw', 'compressed-src.raw', '8M'] },
      { tool: 'io', file: 'compressed-src.raw', format: 'raw', cmds: WRITES },
      { tool: 'compress', from: 'compressed-src.raw', to: 'compressed.qcow2' },
    ],
    reads: READS,
  },
  {
    name: 'snapshots',
    file: 'snapshots.qcow2',
    steps: [
      { tool: 'img', args: ['create', '-f', 'qcow2', 'snapshots.qcow2', '8M'] },
      { tool: 'io', file: 'snapshots.qcow2', cmds: ['write -P 0x55 0 256k'] },
      { tool: 'img', args: ['snapshot', '-c', 's1', 'snapshots.qcow2'] },
      { tool: 'io', file: 'snapshots.qcow2', cmds: ['write -P 0x66 64k 64k'] },
      { tool: 'img', args: ['snapshot', '-c', 's2', 'snapshots.qcow2'] },
      { tool: 'io', file: 'snapshots.qcow2', cmds: ['write -P 0x77 128k 64k', 'write -P 0x78 4M 64k'] },
    ],
    reads: [
      { pattern: '0x55', offset: 0, length: 64 * K },
      { pattern: '0x66', offset: 64 * K, length: 64 * K },
      { pattern: '0x77', offset: 128 * K, length: 64 * K },
      { pattern: '0x55', offset: 192 * K, length: 64 * K },
      { pattern: '0x78', offset: 4 * M, length: 64 * K },
    ],
    snapshots: [
      { name: 's1', reads: [{ pattern: '0x55', offset: 0, length: 256 * K }, { pattern: '0', offset: 4 * M, length: 64 * K }] },
      { name: 's2', reads: [{ pattern: '0x55', offset: 0, length: 64 * K }, { pattern: '0x66', offset: 64 * K, length: 64 * K }, { pattern: '0x55', offset: 128 * K, length: 128 * K }] },
    ],
  },
  {
    name: 'chain',
    file: 'chain-top.qcow2',
    steps: [
      { tool: 'img', args: ['create', '-f', 'raw', 'chain-base.raw', '8M'] },
      { tool: 'io', file: 'chain-base.raw', format: 'raw', cmds: ['write -P 1 0 1M'] },
      { tool: 'img', args: ['create', '-f', 'qcow2', '-b', 'chain-base.raw', '-F', 'raw', 'chain-mid.qcow2'] },
      { tool: 'io', file: 'chain-mid.qcow2', cmds: ['write -P 2 512k 512k'] },
      { tool: 'img', args: ['create', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'chain-mid.qcow2', '-F', 'qcow2', 'chain-top.qcow2'] },
      { tool: 'io', file: 'chain-top.qcow2', cmds: ['write -P 3 768k 64k', 'write -z 0 64k'] },
    ],
    reads: [
      { pattern: '0', offset: 0, length: 64 * K },
      { pattern: '1', offset: 64 * K, length: 448 * K },
      { pattern: '2', offset: 512 * K, length: 256 * K },
      { pattern: '3', offset: 768 * K, length: 64 * K },
      { pattern: '2', offset: 832 * K, length: 192 * K },
      { pattern: '0', offset: M, length: 7 * M },
    ],
  },
];

/** Build a variant with qemu-img/qemu-io in `dir`; returns the file to look at. */
export function buildWithQemu(dir: string, v: Variant): string {
  for (const s of v.steps) {
    const r =
      s.tool === 'img'
        ? run('qemu-img', s.args, dir)
        : s.tool === 'io'
          ? run('qemu-io', [...(s.format ? ['-f', s.format] : []), ...s.cmds.flatMap((c) => ['-c', c]), s.file], dir)
          : run('qemu-img', ['convert', '-c', '-O', 'qcow2', s.from, s.to], dir);
    expect(r.status, `${v.name}: ${JSON.stringify(s)}: ${r.stderr}`).toBe(0);
  }
  return v.file;
}

/** Build a variant with `offload img` only (names prefixed "o-"); returns the file to look at. */
export async function buildWithOffload(dir: string, v: Variant): Promise<string> {
  const rename = (a: string) => (/\.(qcow2|raw)$/.test(a) ? `o-${a}` : a);
  for (const s of v.steps) {
    let r;
    if (s.tool === 'img') r = await runImg(s.args.map(rename), dir);
    else if (s.tool === 'io') r = await runImg(['io', ...(s.format ? ['-f', s.format] : []), ...s.cmds.flatMap((c) => ['-c', c]), rename(s.file)], dir);
    else throw new Error('offload img does not write compressed clusters');
    expect(r.status, `${v.name}: ${JSON.stringify(s)}: ${r.stderr}`).toBe(0);
  }
  return rename(v.file);
}
