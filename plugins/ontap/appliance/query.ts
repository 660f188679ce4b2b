/** ONTAP collection query handling for the mock: field filters, `fields=` selection, paging. */

/** Query parameters that are not field filters. */
const RESERVED = new Set(['fields', 'max_records', 'return_records', 'return_timeout', 'order_by', 'start.uuid', 'svm']);

function getPath(obj: unknown, path: string): unknown {
  let cur: unknown = obj;
  for (const key of path.split('.')) {
    if (cur === null || typeof cur !== 'object') return undefined;
    cur = (cur as Record<string, unknown>)[key];
  }
  return cur;
}

function setPath(obj: Record<string, unknown>, path: string, value: unknown): void {
  const keys = path.split('.');
  let cur = obj;
  for (const key of keys.slice(0, -1)) {
    if (cur[key] === undefined || typeof cur[key] !== 'object') cur[key] = {};
    cur = cur[key] as Record<string, unknown>;
  }
  cur[keys[keys.length - 1]!] = value;
}

/** ONTAP query values: `a|b` alternatives, `*` wildcards, `!v` negation. */
function matchesValue(actual: unknown, expr: string): boolean {
  if (actual === undefined || actual === null || typeof actual === 'object') return false;
  const text = String(actual);
  return expr.split('|').some((alt) => {
    const negate = alt.startsWith('!');
    const pattern = negate ? alt.slice(1) : alt;
    const re = new RegExp(`^${pattern.split('*').map((p) => p.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('.*')}$`);
    return re.test(text) !== negate;
  });
}

export function filterRecords<T>(records: T[], query: URLSearchParams): T[] {
  const filters = [...query.entries()].filter(([k]) => !RESERVED.has(k));
  return records.filter((r) => filters.every(([k, v]) => matchesValue(getPath(r, k), v)));
}

/**
 * Keep only the requested fields (dotted paths); the keys (`uuid`, `name`) and `_links` always
 * stay. `*` or `**` selects everything; no `fields` gives `defaults` (undefined = everything).
 */
export function selectFields<T extends object>(record: T, fields: string | null, defaults?: string[]): Partial<T> {
  const list = fields ? fields.split(',').map((f) => f.trim()).filter(Boolean) : defaults;
  if (!list || list.includes('*') || list.includes('**')) return record;
  const out: Record<string, unknown> = {};
  for (const path of ['uuid', 'name', '_links', ...list]) {
    const value = getPath(record, path);
    if (value !== undefined) setPath(out, path, structuredClone(value));
  }
  return out as Partial<T>;
}

export interface PageResult<T> {
  records: T[];
  nextStart?: string;
}

/**
 * One page after the `start.uuid` cursor, in uuid order. `limit` caps the page (max_records);
 * `truncateTo` imitates a `return_timeout` that expired early: fewer records, still a `next`.
 */
export function pageRecords<T extends { uuid: string }>(records: T[], start: string | null, limit: number, truncateTo?: number): PageResult<T> {
  const sorted = [...records].sort((a, b) => (a.uuid < b.uuid ? -1 : a.uuid > b.uuid ? 1 : 0));
  const rest = start ? sorted.filter((r) => r.uuid > start) : sorted;
  const size = Math.min(limit, truncateTo ?? Infinity);
  const page = rest.slice(0, size);
  const more = rest.length > page.length;
  return more && page.length > 0 ? { records: page, nextStart: page[page.length - 1]!.uuid } : more ? { records: page, nextStart: start ?? '' } : { records: page };
}
