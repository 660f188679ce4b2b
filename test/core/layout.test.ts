/**
 * The dependency rule of the design (§2): core imports no plugin; plugins import core only
 * through core/index.ts and never each other, with two sanctioned exceptions, both for the mock
 * appliances (files under a plugin's `appliance/` folder): the qcow2 engine through
 * plugins/qcow2/index.ts, and the appliance kit through plugins/appliance-kit/index.ts. The kit
 * is not a plugin (plugins/index.ts does not list it): it imports only core (through
 * core/index.ts), node built-ins and zod — never a plugin.
 */
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = resolve(import.meta.dirname, '../..');
const KIT = 'plugins/appliance-kit';
/** The only package the kit's code may import: its fault rules are zod schemas, like every schema of the project. */
const KIT_PACKAGES = ['zod'];

function tsFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    if (statSync(p).isDirectory()) return n === 'node_modules' ? [] : tsFiles(p);
    return n.endsWith('.ts') ? [p] : [];
  });
}

/** Every import of a file: relative ones as paths from the root, packages as `pkg:NAME`, built-ins as `node:NAME`. */
function specifiers(file: string): string[] {
  const text = readFileSync(file, 'utf8');
  const out: string[] = [];
  for (const m of text.matchAll(/(?:import|export)\s[^'";]*?from\s+['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)/g)) {
    const spec = m[1] ?? m[2]!;
    if (spec.startsWith('.')) out.push(relative(root, resolve(dirname(file), spec)));
    else out.push(spec.startsWith('node:') ? spec : `pkg:${spec}`);
  }
  return out;
}

const external = (spec: string) => spec.startsWith('pkg:') || spec.startsWith('node:');

/** The relative imports of a file, as paths from the root. */
function imports(file: string): string[] {
  return specifiers(file).filter((s) => !external(s));
}

/** The imports of plugin file `rel` (a path from the root) that break the rule. */
function pluginViolations(rel: string, specs: string[]): string[] {
  const own = rel.split('/')[1];
  const inAppliance = rel.split('/')[2] === 'appliance';
  const inKit = rel.startsWith(`${KIT}/`);
  const allowed = (i: string): boolean => {
    // The kit's own code: node built-ins and zod only (its tests may use test tools).
    if (external(i)) return !(inKit && !rel.includes('/test/') && i.startsWith('pkg:') && !KIT_PACKAGES.includes(i.slice(4)));
    if (i.startsWith('core')) return i === 'core/index.js';
    if (inKit) return i.startsWith(`${KIT}/`);
    if (!i.startsWith('plugins/') || i.split('/')[1] === own) return true;
    return inAppliance && (i === 'plugins/qcow2/index.js' || i === `${KIT}/index.js`);
  };
  return specs.filter((i) => !allowed(i)).map((i) => `${rel} → ${i}`);
}

describe('dependency rule', () => {
  it('core/ imports nothing from plugins/', () => {
    const bad = tsFiles(join(root, 'core')).flatMap((f) => imports(f).filter((i) => i.startsWith('plugins')).map((i) => `${relative(root, f)} → ${i}`));
    expect(bad).toEqual([]);
  });

  it('plugins import core only through core/index.ts, and never another plugin (mock appliances: qcow2 and the kit, through their index.ts)', () => {
    const bad: string[] = [];
    for (const f of tsFiles(join(root, 'plugins'))) {
      const rel = relative(root, f);
      if (rel === 'plugins/index.ts') continue;
      bad.push(...pluginViolations(rel, specifiers(f)));
    }
    expect(bad).toEqual([]);
  });

  it('both mock appliances use the kit, and plugins/index.ts does not list it (it binds nothing)', () => {
    for (const mock of ['plugins/flasharray/appliance', 'plugins/ontap/appliance']) {
      expect(tsFiles(join(root, mock)).some((f) => imports(f).includes(`${KIT}/index.js`)), mock).toBe(true);
    }
    expect(imports(join(root, 'plugins/index.ts')).some((i) => i.startsWith(`${KIT}/`))).toBe(false);
  });

  // Shipped as offload-broker/testing: it may use only the public API that a vendor's plugin sees.
  it('testing/ imports core only through core/index.ts, and nothing from plugins/ or test/', () => {
    const bad = tsFiles(join(root, 'testing')).flatMap((f) => imports(f)
      .filter((i) => (i.startsWith('core') && i !== 'core/index.js') || i.startsWith('plugins/') || i.startsWith('test/'))
      .map((i) => `${relative(root, f)} → ${i}`));
    expect(bad).toEqual([]);
  });

  it('outside the engine (engine/ and its codecs in format/), the qcow2 plugin uses it through engine/index.ts only (tests aside)', () => {
    const inside = ['plugins/qcow2/engine/', 'plugins/qcow2/format/', 'plugins/qcow2/test/'];
    const outside = tsFiles(join(root, 'plugins/qcow2')).map((f) => relative(root, f)).filter((rel) => !inside.some((d) => rel.startsWith(d)));
    expect(outside.filter((rel) => rel.startsWith('plugins/qcow2/jobs/') || rel.startsWith('plugins/qcow2/pool/')).length).toBeGreaterThan(10);
    const bad = outside
      .flatMap((rel) => imports(join(root, rel))
        .filter((i) => (i.startsWith('plugins/qcow2/engine/') && i !== 'plugins/qcow2/engine/index.js') || i.startsWith('plugins/qcow2/format/'))
        .map((i) => `${rel} → ${i}`));
    expect(bad).toEqual([]);
  });

  it('one place for tests: a plugin\'s in plugins/NAME/test/, everything else in test/ (none beside the code)', () => {
    const misplaced = [...tsFiles(join(root, 'plugins')), ...tsFiles(join(root, 'core')), ...tsFiles(join(root, 'testing'))]
      .map((f) => relative(root, f))
      .filter((rel) => rel.endsWith('.test.ts') && !/^plugins\/[^/]+\/test\//.test(rel));
    expect(misplaced).toEqual([]);
    expect(readdirSync(join(root, 'plugins')).filter((p) => statSync(join(root, 'plugins', p)).isDirectory() && existsSync(join(root, 'plugins', p, 'tests')))).toEqual([]);
  });

  it('the checker sees violations (it is not vacuous)', () => {
    expect(imports(join(root, 'plugins/index.ts')).some((i) => i.startsWith('plugins/'))).toBe(true);
    // The kit's rule: only appliance folders, only its index.ts; the kit itself never imports a plugin.
    expect(pluginViolations('plugins/flasharray/client.ts', [`${KIT}/index.js`])).toHaveLength(1);
    expect(pluginViolations('plugins/ontap/appliance/server.ts', [`${KIT}/faults.js`])).toHaveLength(1);
    expect(pluginViolations('plugins/ontap/appliance/server.ts', [`${KIT}/index.js`, 'plugins/qcow2/index.js'])).toEqual([]);
    expect(pluginViolations(`${KIT}/faults.ts`, ['plugins/qcow2/index.js', 'plugins/ontap/api/codes.js'])).toHaveLength(2);
    expect(pluginViolations(`${KIT}/http.ts`, ['core/model/errors.js', 'pkg:commander', 'test/support/memory-backend.js'])).toHaveLength(3);
    expect(pluginViolations(`${KIT}/http.ts`, ['core/index.js', 'node:http', 'pkg:zod', `${KIT}/random.js`])).toEqual([]);
  });
});
