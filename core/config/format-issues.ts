import type { z } from 'zod';

/** `backends[1].endpoint` from a zod issue path under a prefix. */
export function formatPath(prefix: string, path: readonly PropertyKey[]): string {
  let out = prefix;
  for (const p of path) {
    if (typeof p === 'number') out += `[${p}]`;
    else out += out ? `.${String(p)}` : String(p);
  }
  return out || '(root)';
}

/** One readable message per zod issue: `expected URL`, `expected number, got string`, … */
export function describeIssue(issue: z.core.$ZodIssue): string {
  const i = issue as z.core.$ZodIssue & { format?: string; expected?: string; keys?: string[]; input?: unknown };
  if (i.code === 'invalid_format' && i.format === 'url') return 'expected URL';
  if (i.code === 'invalid_type') {
    if (i.input === undefined) return `missing (expected ${i.expected})`;
    return `expected ${i.expected}, got ${describeInput(i.input)}`;
  }
  if (i.code === 'unrecognized_keys') return `unknown field${i.keys!.length > 1 ? 's' : ''} ${i.keys!.map((k) => `"${k}"`).join(', ')}`;
  return i.message.replace(/^Invalid input: /, '');
}

function describeInput(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  return typeof v;
}
