/**
 * `offload appliance flasharray` as a user runs it: spawn the CLI, read the URL it prints, and
 * drive the API with plain HTTP the way curl would (login, create, snapshot, copy, list).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { VolumeList, VolumeSnapshotList } from '../api/schemas.js';
import { tsChild } from '../../../test/support/ts-child.js';

const ROOT = resolve(import.meta.dirname, '../../..');
const ARGS = [...tsChild('bin/main.ts'), 'appliance', 'flasharray'];
const MiB = 1024 * 1024;

interface Running { child: ChildProcess; url: string; token: string; output: () => string }

const children: ChildProcess[] = [];

function start(...extra: string[]): Promise<Running> {
  const child = spawn(process.execPath, [...ARGS, '--port', '0', ...extra], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let out = '';
  return new Promise((done, fail) => {
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const url = /listening on (http:\/\/\S+)/.exec(out)?.[1];
      const token = /api token: (\S+)/.exec(out)?.[1];
      if (url && token) done({ child, url, token, output: () => out });
    });
    child.stderr!.on('data', (d: Buffer) => { out += d.toString(); });
    child.on('exit', (code) => fail(new Error(`appliance exited (${code}) before listening:\n${out}`)));
  });
}

function stop(r: Running): Promise<number | null> {
  return new Promise((done) => {
    r.child.once('exit', (code) => done(code));
    r.child.kill('SIGTERM');
  });
}

afterEach(() => {
  for (const c of children.splice(0)) if (c.exitCode === null) c.kill('SIGKILL');
});

async function curl(url: string, method: string, token: string, body?: unknown): Promise<Response> {
  return fetch(url, {
    method,
    headers: { 'x-auth-token': token, ...(body ? { 'content-type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
}

describe('offload appliance flasharray', () => {
  it('serves the API that curl can drive, with a generated token, and stops on SIGTERM', async () => {
    const app = await start();
    expect(app.token).toMatch(/^[0-9a-f-]{36}$/);
    expect(app.output()).toContain('(generated)');
    const login = await fetch(`${app.url}/api/2.26/login`, { method: 'POST', headers: { 'api-token': app.token } });
    expect(login.status).toBe(200);
    const session = login.headers.get('x-auth-token')!;
    const api = `${app.url}/api/2.26`;
    expect((await curl(`${api}/volumes?names=vm1`, 'POST', session, { provisioned: 10 * MiB })).status).toBe(200);
    const snap = VolumeSnapshotList.parse(await (await curl(`${api}/volume-snapshots?source_names=vm1`, 'POST', session, { suffix: 'gold' })).json());
    expect(snap.items[0]!.name).toBe('vm1.gold');
    const copy = VolumeList.parse(await (await curl(`${api}/volumes?names=vm2`, 'POST', session, { source: { name: 'vm1.gold' } })).json());
    expect(copy.items[0]).toMatchObject({ name: 'vm2', provisioned: 10 * MiB, source: { name: 'vm1.gold' } });
    const listed = await curl(`${api}/volumes?limit=1`, 'GET', session);
    const page = VolumeList.parse(await listed.json());
    expect(page.items.map((v) => v.name)).toEqual(['vm1']);
    expect(page.more_items_remaining).toBe(true);
    expect(listed.headers.get('x-next-token')).toBe(page.continuation_token);
    expect(await stop(app)).toBe(0);
  });

  it('keeps its state across restarts with --state and accepts a given --api-token', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'fa-cli-'));
    try {
      let app = await start('--state', dir, '--api-token', 'my-token-1');
      expect(app.token).toBe('my-token-1');
      let s = (await fetch(`${app.url}/api/2.26/login`, { method: 'POST', headers: { 'api-token': 'my-token-1' } })).headers.get('x-auth-token')!;
      await curl(`${app.url}/api/2.26/volumes?names=persist`, 'POST', s, { provisioned: MiB });
      await stop(app);
      // restart, this time with a fault config file: the first volume listing gets a 503
      const faults = join(dir, 'faults.json');
      await writeFile(faults, JSON.stringify({ seed: 3, rules: [{ method: 'GET', path: '/api/*/volumes', nth: [1], action: { type: 'status', status: 503 } }] }));
      app = await start('--state', dir, '--api-token', 'my-token-1', '--faults', faults);
      s = (await fetch(`${app.url}/api/2.26/login`, { method: 'POST', headers: { 'api-token': 'my-token-1' } })).headers.get('x-auth-token')!;
      expect((await curl(`${app.url}/api/2.26/volumes`, 'GET', s)).status).toBe(503);
      const list = VolumeList.parse(await (await curl(`${app.url}/api/2.26/volumes`, 'GET', s)).json());
      expect(list.items.map((v) => v.name)).toEqual(['persist']);
      await stop(app);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('bad usage exits 2 with one line', () => {
    const r = spawnSync(process.execPath, [...ARGS, '--port', 'abc'], { cwd: ROOT, encoding: 'utf8', timeout: 30_000 });
    expect(r.status).toBe(2);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toContain('--port');
  });
});
