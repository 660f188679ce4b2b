import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { HAVE_QEMU, run } from '../../../test/interop/img-qemu.js';
import { qdictKeyOrder, qemuJsonPretty, qemuJsonString, tdbHash, type QemuJsonValue } from '../cli/qemu-json.js';

// QAPI member order (qapi/block-core.json, QEMU 7.2): the order QEMU inserts keys into its QDicts.
const SCHEMA_ORDER = [
  // ImageInfo
  'filename', 'format', 'dirty-flag', 'actual-size', 'virtual-size', 'cluster-size', 'encrypted', 'compressed',
  'backing-filename', 'full-backing-filename', 'backing-filename-format', 'snapshots', 'backing-image', 'format-specific',
  // ImageInfoSpecific (union) and ImageInfoSpecificQCow2
  'type', 'data', 'compat', 'data-file', 'data-file-raw', 'extended-l2', 'lazy-refcounts', 'corrupt', 'refcount-bits',
  'encrypt', 'bitmaps', 'compression-type',
  // SnapshotInfo
  'id', 'name', 'vm-state-size', 'date-sec', 'date-nsec', 'vm-clock-sec', 'vm-clock-nsec', 'icount',
  // ImageCheck
  'check-errors', 'image-end-offset', 'corruptions', 'leaks', 'corruptions-fixed', 'leaks-fixed', 'total-clusters',
  'allocated-clusters', 'fragmented-clusters', 'compressed-clusters',
];

/** Rebuild a parsed value with its keys in schema order, as QEMU builds it, forgetting qemu's order. */
function inSchemaOrder(v: unknown): QemuJsonValue {
  if (Array.isArray(v)) return v.map(inSchemaOrder);
  if (v !== null && typeof v === 'object') {
    const keys = Object.keys(v).sort((a, b) => SCHEMA_ORDER.indexOf(a) - SCHEMA_ORDER.indexOf(b));
    for (const k of keys) expect(SCHEMA_ORDER, `unknown key ${k}`).toContain(k);
    return Object.fromEntries(keys.map((k) => [k, inSchemaOrder((v as Record<string, unknown>)[k])]));
  }
  return v as QemuJsonValue;
}

describe('tdbHash', () => {
  it('puts qemu-img info keys in the order qemu-img 7.2 prints them', () => {
    const order = qdictKeyOrder(['filename', 'format', 'dirty-flag', 'actual-size', 'virtual-size', 'cluster-size', 'encrypted',
      'backing-filename', 'full-backing-filename', 'backing-filename-format', 'snapshots', 'format-specific']);
    expect(order).toEqual(['backing-filename-format', 'snapshots', 'virtual-size', 'filename', 'cluster-size', 'format',
      'actual-size', 'format-specific', 'full-backing-filename', 'encrypted', 'backing-filename', 'dirty-flag']);
  });

  it('is an unsigned 32-bit value and hashes bytes, not UTF-16 units', () => {
    for (const k of ['', 'a', 'virtual-size', 'é', '😀', 'x'.repeat(100)]) {
      const h = tdbHash(k);
      expect(Number.isInteger(h) && h >= 0 && h < 2 ** 32).toBe(true);
    }
    expect(tdbHash('é')).not.toBe(tdbHash('\u00e9'.normalize('NFD')));
  });

  it('within one bucket lists the most recently inserted key first', () => {
    // Find two distinct keys sharing a bucket.
    const byBucket = new Map<number, string>();
    let pair: [string, string] | undefined;
    for (let i = 0; !pair; i++) {
      const k = `k${i}`;
      const b = tdbHash(k) % 512;
      const other = byBucket.get(b);
      if (other) pair = [other, k];
      else byBucket.set(b, k);
    }
    expect(qdictKeyOrder(pair)).toEqual([pair[1], pair[0]]);
    expect(qdictKeyOrder([pair[1], pair[0]])).toEqual([pair[0], pair[1]]);
  });
});

describe('qemuJsonPretty', () => {
  it('prints scalars, nesting and empty containers like qobject_to_json_pretty', () => {
    expect(qemuJsonPretty({ a: 1, b: [true, null], c: {}, d: [] })).toBe(
      ['{', ...qdictKeyOrder(['a', 'b', 'c', 'd']).map((k, i, all) => {
        const v = { a: '1', b: '[\n        true,\n        null\n    ]', c: '{\n    }', d: '[\n    ]' }[k];
        return `    "${k}": ${v}${i < all.length - 1 ? ',' : ''}`;
      }), '}'].join('\n'),
    );
    expect(qemuJsonPretty(2n ** 63n - 1n)).toBe('9223372036854775807');
    expect(() => qemuJsonPretty(1.5)).toThrow(TypeError);
  });

  it('omits keys whose value is undefined', () => {
    expect(qemuJsonPretty({ a: undefined, b: 'x' })).toBe('{\n    "b": "x"\n}');
  });

  it('escapes strings as QEMU does (\\uXXXX for control and non-ASCII, surrogate pairs)', () => {
    expect(qemuJsonString('a"b\\c\n\t\r\b\f')).toBe('"a\\"b\\\\c\\n\\t\\r\\b\\f"');
    expect(qemuJsonString('\u0001é\u007f')).toBe('"\\u0001\\u00E9\\u007F"');
    expect(qemuJsonString('😀')).toBe('"\\uD83D\\uDE00"');
  });
});

describe.skipIf(!HAVE_QEMU)('qemuJsonPretty against qemu-img 7.2 output', () => {
  const dir = mkdtempSync(join(tmpdir(), 'img-json-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const qemu = (...args: string[]) => {
    const r = run('qemu-img', args, dir);
    return r;
  };
  const io = (file: string, ...cmds: string[]) => run('qemu-io', [...cmds.flatMap((c) => ['-c', c]), file], dir);

  it('reproduces info, info --backing-chain and check byte for byte', () => {
    qemu('create', '-f', 'raw', 'base.raw', '4M');
    io('base.raw', 'write -P 1 0 64k');
    qemu('create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'mid.qcow2');
    qemu('create', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4k', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2');
    io('top.qcow2', 'write -P 2 0 8k');
    qemu('snapshot', '-c', 'snap "one" é', 'top.qcow2');
    qemu('create', '-f', 'qcow2', '-o', 'lazy_refcounts=on,refcount_bits=64', 'lazy.qcow2', '1G');
    const outputs = [
      qemu('info', '--output=json', 'top.qcow2'),
      qemu('info', '--output=json', '--backing-chain', 'top.qcow2'),
      qemu('info', '--output=json', 'lazy.qcow2'),
      qemu('check', '--output=json', 'top.qcow2'),
      qemu('check', '--output=json', 'lazy.qcow2'),
    ];
    for (const r of outputs) {
      expect(r.status).toBe(0);
      expect(r.stdout.endsWith('\n')).toBe(true);
      const text = r.stdout.slice(0, -1);
      expect(qemuJsonPretty(inSchemaOrder(JSON.parse(text)))).toBe(text);
    }
  });
});
