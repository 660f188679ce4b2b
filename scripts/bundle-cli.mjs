/**
 * Bundles the compiled CLI (npm packages included) into dist/cli/, which `bin/offload` runs.
 * Loading a handful of files instead of ~150 modules takes about 60 ms off every start.
 *
 * - dist/cli/main.js (from dist/bin/main.js): every command. Code splitting keeps lazy imports
 *   lazy: a broker command never loads the appliance plugins it does not use.
 * - dist/cli/img.cjs + img-bundle.cjs + img-bundle.cjs.cache: `offload img …` alone, started as
 *   fast as we can (qemu-img users run it in loops). img-bundle.cjs is dist/bin/img.js and what it
 *   imports, in one CommonJS file: esbuild drops the lazy imports of the broker that nothing
 *   reachable from there calls, so it holds only commander and the qcow2 code. img.cjs
 *   (scripts/img-launcher.cjs) runs it with V8's code cache, which is written here by running a
 *   few img commands.
 *
 * better-sqlite3 stays outside the bundles: it is a native addon that finds its binary through
 * node_modules. Everything stays in dist/cli/: the qcow2 engine finds its native addon from the
 * folder of the running module.
 */
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { build } from 'esbuild';

// Chunk names carry content hashes: old chunks would pile up.
rmSync('dist/cli', { recursive: true, force: true });

const common = {
  bundle: true,
  platform: 'node',
  target: 'node20',
  // Packages that load files beside their own code (a native addon, a wasm module) stay in node_modules.
  external: ['better-sqlite3', '@bokuweb/zstd-wasm'],
  logLevel: 'warning',
};

/**
 * commander requires node:child_process when it loads, only to spawn executable subcommands
 * (which offload does not define); loading it pulls in net, dgram and more, ~4 ms of an
 * `offload img` start. In the img bundle commander gets a stand-in that loads the real module
 * on first use, whatever it asks of it.
 */
const lazyChildProcessForCommander = {
  name: 'lazy-child-process-for-commander',
  setup(b) {
    b.onResolve({ filter: /^node:child_process$/ }, (args) =>
      /[\\/]node_modules[\\/]commander[\\/]/.test(args.importer) ? { path: 'child_process', namespace: 'lazy' } : undefined);
    b.onLoad({ filter: /.*/, namespace: 'lazy' }, () => ({
      // This require is resolved again, from outside commander: the real module, loaded when called.
      contents: "module.exports = new Proxy({}, { get: (_, key) => require('node:child_process')[key] });",
      loader: 'js',
    }));
  },
};

await Promise.all([
  build({
    ...common,
    entryPoints: ['dist/bin/main.js'],
    outdir: 'dist/cli',
    format: 'esm',
    splitting: true,
    // CommonJS packages bundled into ESM (commander, yaml) still call require() for node builtins.
    banner: { js: "import { createRequire as __offloadCreateRequire } from 'node:module'; const require = __offloadCreateRequire(import.meta.url);" },
  }),
  build({
    ...common,
    entryPoints: ['dist/bin/img.js'],
    outfile: 'dist/cli/img-bundle.cjs',
    // CommonJS: Node starts a CommonJS main file ~9 ms sooner than an ES module (no ESM loader).
    format: 'cjs',
    // The sources are ES modules, strict mode: "use strict" must come first, before the banner.
    // import.meta.url (the qcow2 engine finds its native addon with it) becomes the bundle's URL.
    banner: { js: "'use strict';\nvar __offloadImportMetaUrl = require('node:url').pathToFileURL(__filename).href;" },
    define: { 'import.meta.url': '__offloadImportMetaUrl' },
    plugins: [lazyChildProcessForCommander],
    // Whitespace and syntax only (names stay, for stack traces): 350 -> 215 KB, and `img info`
    // starts ~3 ms sooner (less to read and decode). OFFLOAD_DEBUG stacks name functions, but their
    // line numbers point into this file; `node dist/cli/main.js img …` runs unminified code.
    minifyWhitespace: true,
    minifySyntax: true,
  }),
]);
copyFileSync('scripts/img-launcher.cjs', 'dist/cli/img.cjs');

// The code cache: the functions that these commands run, compiled. Each run starts from the cache
// of the one before and adds what it compiled. It does not change what a command does: only how
// soon it starts (see scripts/img-launcher.cjs), so a run that fails is a warning here (the tests
// report the command). The runs start node as bin/offload does for img: V8 rejects a cache made
// with other V8 flags, which NODE_OPTIONS could add.
const { NODE_OPTIONS, NODE_EXTRA_CA_CERTS, ...env } = process.env;
const work = mkdtempSync(join(tmpdir(), 'offload-build-'));
try {
  const image = join(work, 'cache.qcow2');
  const runs = [
    ['create', '-q', '-f', 'qcow2', image, '64M'],
    ['io', '-c', 'write -P 1 0 1M', image],
    ['info', image],
    ['info', '--output=json', image],
    ['check', image],
    ['map', image],
    ['convert', '-O', 'raw', image, join(work, 'copy.raw')],
    ['convert', '-O', 'qcow2', image, join(work, 'copy.qcow2')],
    ['compare', image, join(work, 'copy.qcow2')],
  ];
  for (const args of runs) {
    const r = spawnSync(process.execPath, ['dist/cli/img.cjs', 'img', ...args], {
      encoding: 'utf8',
      env: { ...env, OFFLOAD_IMG_WRITE_CODE_CACHE: '1' },
    });
    if (r.status !== 0) console.warn(`offload: making the code cache of \`offload img\`: img ${args[0]} failed (${r.status}): ${r.stderr || r.error}`);
  }
  if (!existsSync('dist/cli/img-bundle.cjs.cache')) console.warn('offload: no code cache for `offload img`: its commands start ~12 ms slower');
} finally {
  rmSync(work, { recursive: true, force: true });
}
