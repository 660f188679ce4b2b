/**
 * The dependency rule of the design (§2): core imports no plugin; plugins import core only
 * through core/index.ts and never each other (an appliance mock may use the qcow2 engine
 * through plugins/qcow2/index.ts).
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = resolve(import.meta.dirname, '../..');

function tsFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    if (statSync(p).isDirectory()) return n === 'node_modules' ? [] : tsFiles(p);
    return n.endsWith('.ts') ? [p] : [];
  });
}

function imports(file: string): string[] {
  const text = readFileSync(file, 'utf8');
  const out: string[] = [];
  for (const m of text.matchAll(/(?:import|export)\s[^'";]*?from\s+['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)/g)) {
    const spec = m[1] ?? m[2]!;
    if (spec.startsWith('.')) out.push(relative(root, resolve(dirname(file), spec)));
  }
  return out;
}

describe('dependency rule', () => {
  it('core/ imports nothing from plugins/', () => {
    const bad = tsFiles(join(root, 'core')).flatMap((f) => imports(f).filter((i) => i.startsWith('plugins')).map((i) => `${relative(root, f)} → ${i}`));
    expect(bad).toEqual([]);
  });

  it('plugins import core only through core/index.ts, and never another plugin', () => {
    const bad: string[] = [];
    for (const f of tsFiles(join(root, 'plugins'))) {
      const rel = relative(root, f);
      if (rel === 'plugins/index.ts') continue;
      const own = rel.split('/')[1];
      for (const i of imports(f)) {
        if (i.startsWith('core') && i !== 'core/index.js') bad.push(`${rel} → ${i}`);
        if (i.startsWith('plugins/')) {
          const other = i.split('/')[1];
          const sanctioned = i === 'plugins/qcow2/index.js' && rel.includes('/appliance/');
          if (other !== own && !sanctioned) bad.push(`${rel} → ${i}`);
        }
      }
    }
    expect(bad).toEqual([]);
  });

  // Shipped as offload-broker/testing: it may use only the public API that a vendor's plugin sees.
  it('testing/ imports core only through core/index.ts, and nothing from plugins/ or test/', () => {
    const bad = tsFiles(join(root, 'testing')).flatMap((f) => imports(f)
      .filter((i) => (i.startsWith('core') && i !== 'core/index.js') || i.startsWith('plugins/') || i.startsWith('test/'))
      .map((i) => `${relative(root, f)} → ${i}`));
    expect(bad).toEqual([]);
  });

  it('the checker sees violations (it is not vacuous)', () => {
    expect(imports(join(root, 'plugins/index.ts')).some((i) => i.startsWith('plugins/'))).toBe(true);
  });
});
