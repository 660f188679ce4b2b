/**
 * JSON exactly as qemu-img 7.2 prints it (`qobject_to_json_pretty`): 4-space indent, `"key": value`,
 * non-ASCII escaped as `\uXXXX`, and object keys in QDict iteration order — ascending
 * `tdb_hash(key) % 512`, and within one bucket the most recently inserted key first. Callers build
 * objects with their keys in QAPI schema order (the order QEMU's visitor inserts them); this module
 * reorders them.
 */

const QDICT_BUCKETS = 512;

/** QEMU's `tdb_hash` (qobject/qdict.c), on the UTF-8 bytes of `key`, as an unsigned 32-bit value. */
export function tdbHash(key: string): number {
  const bytes = Buffer.from(key, 'utf8');
  let v = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) {
    v = (v + ((bytes[i]! << ((i * 5) % 24)) >>> 0)) >>> 0;
  }
  return (Math.imul(1103515243, v) + 12345) >>> 0;
}

/** The keys of an object in the order a QDict built by inserting them in this order iterates them. */
export function qdictKeyOrder(keys: readonly string[]): string[] {
  const indexed = keys.map((key, inserted) => ({ key, inserted, bucket: tdbHash(key) % QDICT_BUCKETS }));
  indexed.sort((a, b) => a.bucket - b.bucket || b.inserted - a.inserted);
  return indexed.map((e) => e.key);
}

/** A JSON string literal as QEMU's `to_json` writes one. */
export function qemuJsonString(s: string): string {
  let out = '"';
  for (const ch of s) {
    const cp = ch.codePointAt(0)!;
    switch (ch) {
      case '"': out += '\\"'; break;
      case '\\': out += '\\\\'; break;
      case '\b': out += '\\b'; break;
      case '\f': out += '\\f'; break;
      case '\n': out += '\\n'; break;
      case '\r': out += '\\r'; break;
      case '\t': out += '\\t'; break;
      default:
        if (cp > 0xffff) {
          out += `\\u${hex4(0xd800 + ((cp - 0x10000) >> 10))}\\u${hex4(0xdc00 + ((cp - 0x10000) & 0x3ff))}`;
        } else if (cp < 0x20 || cp >= 0x7f) {
          out += `\\u${hex4(cp)}`;
        } else {
          out += ch;
        }
    }
  }
  return out + '"';
}

function hex4(n: number): string {
  return n.toString(16).toUpperCase().padStart(4, '0');
}

/** A value QEMU can print: QNull, QNum (integer), QString, QBool, QList, QDict. */
export type QemuJsonValue =
  | null
  | number
  | bigint
  | string
  | boolean
  | readonly QemuJsonValue[]
  | { readonly [key: string]: QemuJsonValue | undefined };

/**
 * `value` printed like `qobject_to_json_pretty` (no trailing newline; qemu-img adds one).
 * Keys whose value is `undefined` are absent (an optional QAPI member that is not set).
 */
export function qemuJsonPretty(value: QemuJsonValue): string {
  return render(value, 0);
}

function render(value: QemuJsonValue, indent: number): string {
  if (value === null) return 'null';
  if (typeof value === 'boolean') return value ? 'true' : 'false';
  if (typeof value === 'bigint') return value.toString();
  if (typeof value === 'number') {
    if (!Number.isInteger(value)) throw new TypeError(`qemuJsonPretty: ${value} is not an integer`);
    return String(value);
  }
  if (typeof value === 'string') return qemuJsonString(value);
  const inner = '\n' + '    '.repeat(indent + 1);
  const close = '\n' + '    '.repeat(indent);
  if (Array.isArray(value)) {
    const items = (value as readonly QemuJsonValue[]).map((v) => inner + render(v, indent + 1));
    return '[' + items.join(',') + close + ']';
  }
  const obj = value as { readonly [key: string]: QemuJsonValue | undefined };
  const keys = qdictKeyOrder(Object.keys(obj).filter((k) => obj[k] !== undefined));
  const items = keys.map((k) => inner + qemuJsonString(k) + ': ' + render(obj[k]!, indent + 1));
  return '{' + items.join(',') + close + '}';
}
