import { describe, expect, it } from 'vitest';
import { isOffloadError } from '../../../core/index.js';
import type { BlockStatus } from '../index.js';
import { mapEntries, mapHuman, mapJson } from '../cli/map.js';
import { pathCombine } from '../cli/names.js';

const st = (start: number, length: number, o: Partial<BlockStatus>): BlockStatus => ({
  start, length, depth: 0, present: true, zero: false, data: true, compressed: false, ...o,
});

describe('map', () => {
  it('merges ranges by qemu-img 7.2\'s rule', () => {
    const entries = mapEntries([
      st(0, 4096, { offset: 0x50000 }),
      st(4096, 4096, { offset: 0x51000 }), // contiguous: merges
      st(8192, 4096, { offset: 0x60000 }), // not contiguous: new entry
      st(12288, 4096, { depth: 1, offset: 0x1000 }), // other layer
      st(16384, 4096, { present: false, zero: true, data: false, depth: 1 }),
      st(20480, 4096, { present: false, zero: true, data: false, depth: 1 }), // merges (no offsets)
      st(24576, 4096, { compressed: true }), // compressed: data without offset
      st(28672, 4096, { compressed: true }),
      st(32768, 0, { offset: 0 }), // empty: dropped
    ], ['top.qcow2', 'base.raw']);
    expect(entries).toEqual([
      { start: 0, length: 8192, depth: 0, present: true, zero: false, data: true, offset: 0x50000, filename: 'top.qcow2' },
      { start: 8192, length: 4096, depth: 0, present: true, zero: false, data: true, offset: 0x60000, filename: 'top.qcow2' },
      { start: 12288, length: 4096, depth: 1, present: true, zero: false, data: true, offset: 0x1000, filename: 'base.raw' },
      { start: 16384, length: 8192, depth: 1, present: false, zero: true, data: false },
      { start: 24576, length: 8192, depth: 0, present: true, zero: false, data: true },
    ]);
    expect(mapJson(entries.slice(0, 1))).toBe('[{ "start": 0, "length": 8192, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680}]');
    expect(mapJson(entries.slice(3, 4))).toBe('[{ "start": 16384, "length": 8192, "depth": 1, "present": false, "zero": true, "data": false}]');
    expect(mapJson([])).toBe('[]');
    expect(mapHuman(entries.slice(0, 4))).toBe([
      'Offset          Length          Mapped to       File',
      '0               0x2000          0x50000         top.qcow2',
      '0x2000          0x1000          0x60000         top.qcow2',
      '0x3000          0x1000          0x1000          base.raw',
    ].join('\n'));
    try {
      mapHuman(entries);
      expect.fail('printed compressed data');
    } catch (e) {
      expect(isOffloadError(e, 'Unsupported')).toBe(true);
      expect((e as Error).message).toBe('File contains external, encrypted or compressed clusters.');
    }
  });

  it('names backing files as path_combine does', () => {
    expect(pathCombine('top.qcow2', 'base.raw')).toBe('base.raw');
    expect(pathCombine('a/b/top.qcow2', 'base.raw')).toBe('a/b/base.raw');
    expect(pathCombine('a/top.qcow2', '../x/base.raw')).toBe('a/../x/base.raw');
    expect(pathCombine('a/top.qcow2', '/abs/base.raw')).toBe('/abs/base.raw');
  });
});
