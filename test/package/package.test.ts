/**
 * The package as users get it: `npm pack` the repository (its built dist/), install the tarball
 * into a new project in a temporary folder, and from there run the README's API example against
 * the mock appliances (started by the installed `offload` bin), type-check it and an out-of-tree
 * plugin against the shipped declarations, and run the contract suite from
 * `offload-broker/testing` on that plugin with the project's own vitest.
 *
 * Installing takes seconds because npm takes packages from the cache that `npm ci` filled, and
 * better-sqlite3 gets its binary from a local prebuild made of this repository's build (what
 * prebuild-install would download from GitHub; its documented `local_prebuilds` setting) instead
 * of compiling SQLite for a minute.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CONFIG, MY_PLUGIN, TSCONFIG } from './out-of-tree.js';

const root = resolve(import.meta.dirname, '../..');
const readme = readFileSync(join(root, 'README.md'), 'utf8');

/** `out` has stdout and stderr as they came, for failure messages; `stdout` alone, to parse. */
interface Run { code: number | null; out: string; stdout: string }

/** The environment of a child: none of this vitest's own variables, so the project's vitest starts afresh. */
function childEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (!k.startsWith('VITEST') && k !== 'NODE_OPTIONS' && k !== 'OFFLOAD_VITEST_JSON' && k !== 'TEST') env[k] = v;
  }
  return { ...env, ...extra };
}

function run(cmd: string, args: string[], cwd: string, env: NodeJS.ProcessEnv = childEnv()): Promise<Run> {
  return new Promise((done, fail) => {
    const child = spawn(cmd, args, { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let stdout = '';
    child.stdout.on('data', (d: Buffer) => {
      out += d;
      stdout += d;
    });
    child.stderr.on('data', (d: Buffer) => (out += d));
    child.on('error', fail);
    child.on('close', (code) => done({ code, out, stdout }));
  });
}

/** The first ```ts block after `heading` in the README. */
function readmeBlock(heading: string): string {
  const at = readme.indexOf(heading);
  expect(at, `README has no "${heading}"`).toBeGreaterThanOrEqual(0);
  const start = readme.indexOf('```ts\n', at) + '```ts\n'.length;
  return readme.slice(start, readme.indexOf('```', start));
}

/** Start a mock appliance with the installed bin; resolves to the URL it prints. */
function startAppliance(project: string, args: string[], children: ChildProcess[]): Promise<string> {
  return new Promise((done, fail) => {
    const child = spawn(join(project, 'node_modules/.bin/offload'), ['appliance', ...args, '--port', '0'], { cwd: project, env: childEnv() });
    children.push(child);
    let out = '';
    const seen = (d: Buffer) => {
      out += d;
      const url = /listening on (http:\/\/[\d.]+:\d+)/.exec(out)?.[1];
      if (url) done(url);
    };
    child.stdout.on('data', seen);
    child.stderr.on('data', seen);
    child.on('error', fail);
    child.on('exit', (code) => fail(new Error(`offload appliance ${args[0]} exited (${code}) before listening:\n${out}`)));
  });
}

describe('the packed package, installed into a project of its own', () => {
  let work: string;
  let project: string;
  let packed: { filename: string; files: { path: string }[] };
  const children: ChildProcess[] = [];

  beforeAll(async () => {
    if (!existsSync(join(root, 'dist/testing/index.js'))) throw new Error('dist/ is not built: run `npm run build` first');
    work = mkdtempSync(join(tmpdir(), 'offload-package-'));
    project = join(work, 'project');
    mkdirSync(join(project, 'src'), { recursive: true });
    mkdirSync(join(project, 'test'));
    mkdirSync(join(project, 'pool'));

    // Packs dist/ as built; `prepare` (the build) is not run again here.
    const pack = await run('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', work], root);
    expect(pack.code, pack.out).toBe(0);
    [packed] = JSON.parse(pack.stdout) as [typeof packed];

    const version = (pkg: string) => (JSON.parse(readFileSync(join(root, 'node_modules', pkg, 'package.json'), 'utf8')) as { version: string }).version;
    const sqlite = version('better-sqlite3');
    const prebuilds = join(work, 'prebuilds');
    mkdirSync(prebuilds);
    const prebuild = `better-sqlite3-v${sqlite}-node-v${process.versions.modules}-${process.platform}-${process.arch}.tar.gz`;
    const tar = await run('tar', ['-czf', join(prebuilds, prebuild), '-C', join(root, 'node_modules/better-sqlite3'), 'build/Release/better_sqlite3.node'], root);
    expect(tar.code, tar.out).toBe(0);

    writeFileSync(join(project, 'package.json'), JSON.stringify({
      name: 'offload-user', private: true, type: 'module',
      dependencies: {
        'offload-broker': `file:${join(work, packed.filename)}`,
        'better-sqlite3': sqlite, inversify: version('inversify'), zod: version('zod'),
      },
      devDependencies: { vitest: version('vitest'), vite: version('vite'), typescript: version('typescript'), '@types/node': version('@types/node') },
    }, null, 2));
    const install = await run('npm', ['install', '--prefer-offline', '--no-audit', '--no-fund'], project,
      childEnv({ npm_config_better_sqlite3_local_prebuilds: prebuilds }));
    expect(install.code, install.out).toBe(0);

    const example = readmeBlock('## API');
    writeFileSync(join(project, 'example.mjs'), example);
    writeFileSync(join(project, 'example.ts'), example);
    writeFileSync(join(project, 'src/my-plugin.ts'), MY_PLUGIN);
    writeFileSync(join(project, 'test/mine.contract.test.ts'), readmeBlock('**Writing a backend plugin**'));
    writeFileSync(join(project, 'tsconfig.json'), TSCONFIG);
    writeFileSync(join(project, 'offload.yaml'), CONFIG);
  });

  afterAll(async () => {
    await Promise.all(children.map((c) => new Promise((done) => {
      if (c.exitCode !== null || c.signalCode !== null) return done(undefined);
      c.once('exit', done);
      c.kill();
    })));
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it('ships dist/, bin/offload and the native sources, and no tests, benches, maps or TypeScript sources', () => {
    const files = packed.files.map((f) => f.path);
    for (const f of ['bin/offload', 'dist/core/index.js', 'dist/core/index.d.ts', 'dist/plugins/index.js', 'dist/testing/index.js',
      'dist/testing/index.d.ts', 'dist/cli/main.js', 'dist/cli/img.cjs', 'native/fileio/binding.gyp', 'README.md', 'package.json']) {
      expect(files, f).toContain(f);
    }
    const unwanted = files.filter((f) => /(^|\/)(tests?|bench|examples)\/|\.test\.|\.map$/.test(f) || (f.endsWith('.ts') && !f.endsWith('.d.ts')));
    expect(unwanted).toEqual([]);
  });

  it('runs the README API example from the installed package against the mock appliances of its offload bin', async () => {
    const token = 'user-token';
    const password = 'user-password';
    const san = await startAppliance(project, ['flasharray', '--api-token', token], children);
    const nas = await startAppliance(project, ['ontap', '--password', password], children);
    const r = await run('node', ['example.mjs'], project, childEnv({ SAN_URL: san, SAN_TOKEN: token, NAS_URL: nas, NAS_PASSWORD: password }));
    expect(r.code, r.out).toBe(0);
    expect(r.out).toContain("executor: 'host'"); // the plan printed: the host data mover
    expect(r.out).toContain("[ 'alice1' ]"); // the tenant sees its own volume only
    expect(r.out).toContain("{ side: 'target', ref: 'nas1/vm1' }"); // the live copy switched the export over
  });

  it('type-checks the README example and an out-of-tree plugin against the shipped declarations', async () => {
    const r = await run(join(project, 'node_modules/.bin/tsc'), ['-p', 'tsconfig.json'], project);
    expect(r.code, r.out).toBe(0);
  });

  it('runs the contract suite from offload-broker/testing on the out-of-tree plugin with the project\'s vitest', async () => {
    const r = await run(join(project, 'node_modules/.bin/vitest'), ['run', '--reporter=json', '--outputFile=report.json'], project);
    expect(r.code, r.out).toBe(0);
    const report = JSON.parse(readFileSync(join(project, 'report.json'), 'utf8')) as {
      numFailedTests: number; numPassedTests: number; testResults: { assertionResults: { fullName: string; status: string }[] }[];
    };
    expect(report.numFailedTests).toBe(0);
    const passed = report.testResults.flatMap((t) => t.assertionResults).filter((a) => a.status === 'passed').map((a) => a.fullName);
    // Both layers ran on the plugin, and the capability check passed.
    expect(passed.some((n) => n.includes('backend contract: mine') && n.includes('through the broker'))).toBe(true);
    expect(passed.some((n) => n.includes('invalid sizes are InvalidArgument from the backend'))).toBe(true);
    expect(passed.some((n) => n.includes('every reported capability was exercised'))).toBe(true);
    expect(report.numPassedTests).toBeGreaterThanOrEqual(15);
  });
});
