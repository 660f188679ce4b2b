/**
 * dist/cli/img.cjs, what `bin/offload img …` runs (scripts/bundle-cli.mjs copies this file there).
 *
 * It runs the `offload img` bundle next to it (img-bundle.cjs) with V8's code cache for it
 * (img-bundle.cjs.cache, which the build writes after running a few img commands): V8 then neither
 * parses the bundle nor compiles the functions that a command runs, ~12 ms of a ~55 ms start.
 * Node 20 caches compiled code for its own modules only (module.enableCompileCache is Node 22).
 *
 * The cache can only save time. V8 rejects a cache made by another V8 version or with other V8
 * flags and compiles the source as if there were none. V8 checks a cache against the source's
 * length only, so a cache older than the bundle (the bundle was rebuilt or edited afterwards) is not
 * used. With OFFLOAD_IMG_WRITE_CODE_CACHE=1 (the build's runs) the cache is written at exit.
 *
 * CommonJS, not an ES module: Node starts a CommonJS main file ~9 ms sooner (no ESM loader).
 */
'use strict';
const { readFileSync, statSync, writeFileSync } = require('node:fs');
const { join } = require('node:path');
const { Script } = require('node:vm');

const bundle = join(__dirname, 'img-bundle.cjs');
const cacheFile = `${bundle}.cache`;

let cachedData;
try {
  if (statSync(cacheFile).mtimeMs >= statSync(bundle).mtimeMs) cachedData = readFileSync(cacheFile);
} catch {
  // no cache: V8 compiles the bundle
}

// Node's own CommonJS wrapper (on the bundle's first line, so its line numbers stay), run as a
// module file would be: the bundle is this module, in this folder.
const wrapper = `(function (exports, require, module, __filename, __dirname) { ${readFileSync(bundle, 'utf8')}\n});`;
const script = new Script(wrapper, { filename: bundle, cachedData });

if (process.env.OFFLOAD_IMG_WRITE_CODE_CACHE === '1') {
  // At exit, the cache holds every function compiled so far: those the command ran, not only the
  // top level.
  process.once('exit', () => {
    try {
      writeFileSync(cacheFile, script.createCachedData());
    } catch (e) {
      process.stderr.write(`offload: cannot write ${cacheFile}: ${e.message}\n`);
      process.exitCode = 1;
    }
  });
}

script.runInThisContext()(exports, require, module, bundle, __dirname);
