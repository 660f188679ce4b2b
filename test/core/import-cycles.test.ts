/**
 * No module imports itself back, directly or through others (type-only imports count too): a
 * circle means two files that cannot be read, tested or changed one without the other.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = resolve(import.meta.dirname, '../..');

function tsFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    if (statSync(p).isDirectory()) return n === 'node_modules' ? [] : tsFiles(p);
    return n.endsWith('.ts') && !n.endsWith('.test.ts') ? [p] : [];
  });
}

/** Relative imports of a file, as repository paths of .ts files. */
function imports(file: string): string[] {
  const text = readFileSync(file, 'utf8');
  const out: string[] = [];
  for (const m of text.matchAll(/(?:import|export)\s[^'";]*?from\s+['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)|^import\s+['"]([^'"]+)['"]/gm)) {
    const spec = m[1] ?? m[2] ?? m[3]!;
    if (spec.startsWith('.')) out.push(relative(root, resolve(dirname(file), spec)).replace(/\.js$/, '.ts'));
  }
  return out;
}

/** The import graph of the files under `dirs` (edges to files outside them left out). */
function graphOf(dirs: string[]): Map<string, string[]> {
  const files = dirs.flatMap((d) => tsFiles(join(root, d))).map((f) => relative(root, f));
  return new Map(files.map((f) => [f, imports(join(root, f)).filter((i) => files.includes(i))]));
}

/** Every circle in a graph, each as a path that returns to its start. */
function cycles(graph: Map<string, string[]>): string[][] {
  const files = [...graph.keys()];
  const found: string[][] = [];
  const state = new Map<string, 'open' | 'done'>();
  const stack: string[] = [];
  const visit = (f: string) => {
    state.set(f, 'open');
    stack.push(f);
    for (const next of graph.get(f) ?? []) {
      if (state.get(next) === 'open') found.push([...stack.slice(stack.indexOf(next)), next]);
      else if (!state.has(next)) visit(next);
    }
    stack.pop();
    state.set(f, 'done');
  };
  for (const f of files) if (!state.has(f)) visit(f);
  return found;
}

describe('import graph', () => {
  it('has no circle in core/ or plugins/', () => {
    const graph = graphOf(['core', 'plugins']);
    expect(graph.size).toBeGreaterThan(100);
    expect(cycles(graph).map((c) => c.join(' → '))).toEqual([]);
  });

  it('the search finds circles, long and short (it is not vacuous)', () => {
    const g = new Map([['a', ['b']], ['b', ['c', 'd']], ['c', ['a']], ['d', ['d']], ['e', ['a']]]);
    expect(cycles(g)).toEqual([['a', 'b', 'c', 'a'], ['d', 'd']]);
    expect(cycles(new Map([['a', ['b']], ['b', []]]))).toEqual([]);
  });
});
