/**
 * For the service tests: a folder with a config (a local qcow2 pool and a slow `ticker` backend),
 * `offload serve` as a real child process (test/service/cli-child.ts: bin/main.ts plus the ticker),
 * and the CLI run in this process (embedded, or as the service's client with --server) or as a
 * child of its own when a test kills it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { runCli } from '../../core/index.js';
import { builtinPlugins } from '../../plugins/index.js';
import { tickerModule } from '../support/ticker-backend.js';
import { tsChild } from '../support/ts-child.js';

export const ROOT = resolve(import.meta.dirname, '../..');
const CHILD = join(ROOT, 'test/service/cli-child.ts');

export interface Setup { dir: string; config: string; tickLog: string; socket: string }

/** A folder with `offload.yaml`: `local` (qcow2 pool) and `tick` (steps × stepMs ticker stream, logging each step). */
export function setup(o: { steps?: number; stepMs?: number; leaseSeconds?: number } = {}): Setup {
  const dir = mkdtempSync(join(tmpdir(), 'offload-svc-'));
  mkdirSync(join(dir, 'pool'));
  const tickLog = join(dir, 'tick.log');
  const config = join(dir, 'offload.yaml');
  writeFileSync(config, [
    'state: ./state',
    ...(o.leaseSeconds !== undefined ? [`leaseSeconds: ${o.leaseSeconds}`] : []),
    'backends:',
    '  - name: local', '    kind: qcow2', '    path: ./pool',
    '  - name: tick', '    kind: ticker', `    steps: ${o.steps ?? 40}`, `    stepMs: ${o.stepMs ?? 50}`, `    log: ${tickLog}`,
  ].join('\n'));
  return { dir, config, tickLog, socket: join(dir, 'state', 'offload.sock') };
}

/** The ticker's steps, as `[pid, step]`, in the order they ran. */
export function tickSteps(s: Setup): [number, number][] {
  let text = '';
  try {
    text = readFileSync(s.tickLog, 'utf8');
  } catch {
    return [];
  }
  return text.trim().split('\n').filter(Boolean).map((l) => l.split(' ').map(Number) as [number, number]);
}

export interface Result { code: number; out: string; err: string }

/** The CLI in this process (a new broker or client each time, as a new process would open). */
export async function offload(s: Setup, args: string[], env: NodeJS.ProcessEnv = {}): Promise<Result> {
  let out = '';
  let err = '';
  const code = await runCli(['--config', s.config, ...args], {
    plugins: [...builtinPlugins, tickerModule],
    env: { ...process.env, OFFLOAD_SERVER: '', OFFLOAD_TOKEN: '', ...env },
    io: { stdout: { write: (t: string) => (out += t) }, stderr: { write: (t: string) => (err += t) } },
  });
  return { code, out, err };
}

export interface Child { child: ChildProcess; first: Promise<string>; exit: Promise<number | null>; out(): string; err(): string }

/** The CLI as a child process; `first` resolves with its first line of stdout. */
export function offloadChild(s: Setup, args: string[], env: NodeJS.ProcessEnv = {}): Child {
  const child = spawn(process.execPath, [...tsChild(CHILD), '--config', s.config, ...args], {
    cwd: ROOT, env: { ...process.env, OFFLOAD_SERVER: '', OFFLOAD_TOKEN: '', ...env },
  });
  let out = '';
  let err = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => { out += d; });
  child.stderr!.setEncoding('utf8').on('data', (d: string) => { err += d; });
  const exit = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
  const first = new Promise<string>((done, fail) => {
    createInterface({ input: child.stdout! }).once('line', done);
    void exit.then((code) => fail(new Error(`offload ${args.join(' ')} exited ${code} before its first line: ${err}`)));
  });
  first.catch(() => undefined);
  return { child, first, exit, out: () => out, err: () => err };
}

export interface ServiceChild extends Child {
  /** `unix:PATH`, then `http://HOST:PORT` with --listen. */
  addresses: string[];
  /** SIGTERM, and its exit code. */
  stop(): Promise<number | null>;
}

/** `offload serve ARGS…`, ready: its listening addresses printed. */
export async function serve(s: Setup, args: string[] = [], env: NodeJS.ProcessEnv = {}): Promise<ServiceChild> {
  const c = offloadChild(s, ['serve', ...args], env);
  const addresses = (await c.first).split(' ');
  return { ...c, addresses, stop: () => { c.child.kill('SIGTERM'); return c.exit; } };
}

/** One HTTP request to a service (a unix: or http: address), the body parsed when it is JSON. */
export function http(address: string, method: string, path: string, o: { token?: string; body?: string; headers?: Record<string, string> } = {}): Promise<{ status: number; type: string; body: unknown; text: string }> {
  const where = address.startsWith('unix:') ? { socketPath: address.slice(5) } : { host: new URL(address).hostname, port: Number(new URL(address).port) };
  return new Promise((done, fail) => {
    const req = request({ ...where, method, path, headers: { ...(o.token ? { authorization: `Bearer ${o.token}` } : {}), ...(o.body !== undefined ? { 'content-type': 'application/json' } : {}), ...o.headers } }, (res) => {
      let text = '';
      res.setEncoding('utf8').on('data', (d: string) => { text += d; }).on('end', () => {
        const type = res.headers['content-type'] ?? '';
        done({ status: res.statusCode ?? 0, type, text, body: type.includes('json') ? JSON.parse(text) : text });
      });
    });
    req.on('error', fail);
    req.end(o.body);
  });
}

/** Poll until `check` holds (a bounded number of times). */
export async function until(what: string, check: () => boolean | Promise<boolean>, tries = 300, everyMs = 100): Promise<void> {
  for (let i = 0; i < tries; i++) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, everyMs));
  }
  throw new Error(`gave up waiting: ${what}`);
}
