/**
 * How a test starts a TypeScript entry point in a child `node` (a service, a CLI, a crash writer).
 *
 * `node --import tsx ENTRY` transforms every module of the broker on each start: ~0.8 s before
 * `main` runs, and the suite starts such children hundreds of times (a service killed and
 * restarted, a CLI in its own process). Under vitest the entry is bundled once per run instead
 * (esbuild, as tsx transforms it: same tsconfig; npm packages left to node_modules) into the
 * folder test/support/child-bundles.ts made for the run, and started as plain JavaScript: ~0.4 s.
 * The bundle lives under the package root, so the qcow2 engine finds its native addon from it as
 * from the sources. Outside vitest (a child started by hand, a bench) it is tsx, as before.
 */
import { buildSync } from 'esbuild';
import { existsSync, renameSync } from 'node:fs';
import { join, relative, resolve } from 'node:path';
import { inject } from 'vitest';

const ROOT = resolve(import.meta.dirname, '../..');

let folder: string | undefined | null;
const built = new Map<string, string>();

/** The folder of this run's bundles, or null outside a vitest run that made one. */
function bundleFolder(): string | null {
  if (folder === undefined) {
    try {
      folder = inject('childBundles') ?? null;
    } catch {
      folder = null;
    }
  }
  return folder;
}

/** The node arguments that run `entry` (a path, absolute or from the package root). */
export function tsChild(entry: string): string[] {
  const path = resolve(ROOT, entry);
  const dir = bundleFolder();
  if (dir === null) return ['--import', 'tsx', path];
  let out = built.get(path);
  if (out === undefined) {
    out = join(dir, `${relative(ROOT, path).replace(/[\\/]/g, '__')}.mjs`);
    if (!existsSync(out)) {
      // Another test file's worker may be building it too: each writes its own, the rename is atomic.
      const tmp = `${out}.${process.pid}.tmp.mjs`;
      buildSync({
        entryPoints: [path], outfile: tmp, bundle: true, platform: 'node', target: 'node20', format: 'esm',
        packages: 'external', sourcemap: 'inline', logLevel: 'warning',
        // CommonJS modules of ours (none today) or of a test would still call require().
        banner: { js: "import { createRequire as __tsChildCreateRequire } from 'node:module'; const require = __tsChildCreateRequire(import.meta.url);" },
      });
      renameSync(tmp, out);
    }
    built.set(path, out);
  }
  return ['--enable-source-maps', out];
}

declare module 'vitest' {
  export interface ProvidedContext {
    childBundles: string;
  }
}
