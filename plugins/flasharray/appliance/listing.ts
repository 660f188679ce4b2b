/**
 * List queries of the mock array: `names`, `filter`, `destroyed`, `limit`, `continuation_token`,
 * `total_item_count`. Items are ordered by name and the continuation token names the last item
 * returned, so every item is listed exactly once even while others come and go.
 */
import { Messages } from '../api/messages.js';
import { ApiFault } from './array-model.js';

export interface ListQuery {
  names?: string[];
  filter?: (item: Record<string, unknown>) => boolean;
  destroyed?: boolean;
  limit?: number;
  after?: string;
  totalItemCount: boolean;
}

export interface ListResult<T> {
  body: { continuation_token: string | null; more_items_remaining: boolean; total_item_count: number | null; items: T[] };
  nextToken?: string;
}

export function parseListQuery(q: URLSearchParams, namesParam = 'names'): ListQuery {
  const out: ListQuery = { totalItemCount: q.get('total_item_count') === 'true' };
  const names = q.get(namesParam);
  if (names !== null) out.names = splitNames(names);
  const filter = q.get('filter');
  if (filter !== null) out.filter = parseFilter(filter);
  const destroyed = q.get('destroyed');
  if (destroyed !== null) {
    if (destroyed !== 'true' && destroyed !== 'false') throw new ApiFault(400, Messages.badRequest, 'destroyed');
    out.destroyed = destroyed === 'true';
  }
  const limit = q.get('limit');
  if (limit !== null) {
    const n = Number(limit);
    if (!Number.isInteger(n) || n < 1) throw new ApiFault(400, Messages.badRequest, 'limit');
    out.limit = n;
  }
  const token = q.get('continuation_token');
  if (token !== null) out.after = decodeToken(token);
  return out;
}

export function splitNames(text: string): string[] {
  const names = text.split(',').map((s) => s.trim()).filter(Boolean);
  if (names.length === 0) throw new ApiFault(400, Messages.badRequest, 'names');
  return names;
}

/** One page of `items` (already sorted by name). `pageCap` comes from a short-page fault. */
export function page<T extends { name: string }>(items: T[], q: ListQuery, pageCap?: number): ListResult<T> {
  let matching = items;
  if (q.destroyed !== undefined) matching = matching.filter((i) => (i as unknown as { destroyed: boolean }).destroyed === q.destroyed);
  if (q.filter) matching = matching.filter((i) => q.filter!(i as unknown as Record<string, unknown>));
  const total = matching.length;
  const rest = q.after === undefined ? matching : matching.filter((i) => i.name > q.after!);
  const size = Math.min(q.limit ?? Infinity, pageCap ?? Infinity);
  const pageItems = rest.slice(0, size);
  const more = rest.length > pageItems.length;
  const token = more ? encodeToken(pageItems[pageItems.length - 1]!.name) : undefined;
  return {
    body: {
      continuation_token: token ?? null,
      more_items_remaining: more,
      total_item_count: q.totalItemCount ? total : null,
      items: pageItems,
    },
    nextToken: token,
  };
}

/**
 * One page of byte ranges (sorted by offset, not overlapping): the continuation token holds the
 * end of the last range returned, so the next page starts there even if the ranges were
 * computed afresh in between.
 */
export function pageByOffset<T extends { offset: number; length: number }>(items: T[], q: ListQuery, pageCap?: number): ListResult<T> {
  let from = 0;
  if (q.after !== undefined) {
    from = Number(q.after);
    if (!Number.isSafeInteger(from) || from < 0) throw new ApiFault(400, Messages.invalidToken, 'continuation_token');
  }
  const rest = items.filter((i) => i.offset >= from);
  const size = Math.min(q.limit ?? Infinity, pageCap ?? Infinity);
  const pageItems = rest.slice(0, size);
  const more = rest.length > pageItems.length;
  const lastItem = pageItems[pageItems.length - 1];
  const token = more && lastItem ? encodeToken(String(lastItem.offset + lastItem.length)) : more ? encodeToken(String(from)) : undefined;
  return {
    body: { continuation_token: token ?? null, more_items_remaining: more, total_item_count: q.totalItemCount ? items.length : null, items: pageItems },
    nextToken: token,
  };
}

function encodeToken(lastName: string): string {
  return Buffer.from(JSON.stringify({ v: 1, after: lastName })).toString('base64url');
}

function decodeToken(token: string): string {
  try {
    const doc = JSON.parse(Buffer.from(token, 'base64url').toString('utf8')) as { v?: unknown; after?: unknown };
    if (doc.v === 1 && typeof doc.after === 'string') return doc.after;
  } catch { /* fall through */ }
  throw new ApiFault(400, Messages.invalidToken, 'continuation_token');
}

/**
 * A small subset of the array's filter syntax: comparisons `field='value'` / `field!='value'`
 * (dotted fields, `*` wildcards in values) joined by `and`.
 */
export function parseFilter(text: string): (item: Record<string, unknown>) => boolean {
  const clauses = text.split(/\s+and\s+/i).map((c) => c.trim());
  const tests = clauses.map((clause) => {
    const m = /^([A-Za-z_][A-Za-z0-9_.]*)\s*(!=|=)\s*(?:'([^']*)'|"([^"]*)"|([^\s'"]+))$/.exec(clause);
    if (!m) throw new ApiFault(400, `Invalid filter: ${clause}`, 'filter');
    const [, field, op, a, b, c] = m;
    const value = a ?? b ?? c ?? '';
    const pattern = new RegExp(`^${value.split('*').map((s) => s.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('.*')}$`);
    return (item: Record<string, unknown>) => {
      let v: unknown = item;
      for (const part of field!.split('.')) v = v && typeof v === 'object' ? (v as Record<string, unknown>)[part] : undefined;
      const matches = v !== undefined && v !== null && pattern.test(String(v));
      return op === '=' ? matches : !matches;
    };
  });
  return (item) => tests.every((t) => t(item));
}
