/**
 * `offload appliance ontap` as a user runs it: spawn the CLI, read the URL it prints, and drive the
 * API with plain HTTP the way curl would: create → 202 + job → poll → success; FlexClone; split;
 * `_links.next` paging.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { tsChild } from '../support/ts-child.js';

const ROOT = resolve(import.meta.dirname, '../..');
let child: ChildProcess;
let url = '';
let output = '';
const auth = `Basic ${Buffer.from('ops:pa55word').toString('base64')}`;

beforeAll(async () => {
  child = spawn(process.execPath, [...tsChild('bin/main.ts'), 'appliance', 'ontap', '--port', '0', '--username', 'ops', '--password', 'pa55word'], {
    cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'],
  });
  url = await new Promise<string>((done, fail) => {
    child.stdout!.on('data', (d: Buffer) => {
      output += d.toString();
      const m = /listening on (http:\/\/\S+)/.exec(output);
      if (m && /auth:.*\n/.test(output)) done(m[1]!);
    });
    child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
    child.on('exit', (code) => fail(new Error(`appliance exited (${code}):\n${output}`)));
  });
});

afterAll(() => {
  if (child && child.exitCode === null) child.kill('SIGKILL');
});

async function api(method: string, path: string, body?: unknown, user = auth): Promise<{ status: number; json: any }> {
  const res = await fetch(`${url}${path}`, {
    method,
    headers: { authorization: user, ...(body ? { 'content-type': 'application/json' } : {}) },
    ...(body ? { body: JSON.stringify(body) } : {}),
  });
  const text = await res.text();
  return { status: res.status, json: text ? JSON.parse(text) : undefined };
}

/** Poll a job like a client would, bounded. */
async function waitJob(href: string): Promise<any> {
  for (let i = 0; i < 400; i++) {
    const { json } = await api('GET', href);
    if (json.state === 'success' || json.state === 'failure') return json;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`job ${href} did not end`);
}

describe('offload appliance ontap', () => {
  it('prints its endpoint and credentials and refuses bad credentials', async () => {
    expect(output).toMatch(/ops/);
    const bad = await api('GET', '/api/storage/volumes', undefined, `Basic ${Buffer.from('ops:wrong').toString('base64')}`);
    expect(bad.status).toBe(401);
  });

  it('create answers 202 with a job that ends in success', async () => {
    const r = await api('POST', '/api/storage/volumes', { name: 'vol_a', svm: { name: 'svm0' }, size: 64 * 1024 * 1024 });
    expect(r.status).toBe(202);
    const href = r.json.job._links.self.href as string;
    expect(href).toMatch(/^\/api\/cluster\/jobs\//);
    expect((await waitJob(href)).state).toBe('success');
    const list = await api('GET', '/api/storage/volumes?name=vol_a&fields=size,uuid');
    expect(list.json.num_records).toBe(1);
    expect(list.json.records[0].size).toBe(64 * 1024 * 1024);
    const dup = await api('POST', '/api/storage/volumes?return_timeout=5', { name: 'vol_a', svm: { name: 'svm0' }, size: 1024 * 1024 * 64 });
    const dupJob = dup.status === 202 ? await waitJob(dup.json.job._links.self.href) : dup.json;
    expect(JSON.stringify(dupJob)).toMatch(/"code":"1"|"code":1\b|duplicate|already/i);
  });

  it('FlexClone from a snapshot, then a split, both as jobs', async () => {
    const vol = (await api('GET', '/api/storage/volumes?name=vol_a')).json.records[0];
    const snap = await api('POST', `/api/storage/volumes/${vol.uuid}/snapshots`, { name: 'snap1' });
    if (snap.status === 202) expect((await waitJob(snap.json.job._links.self.href)).state).toBe('success');
    const clone = await api('POST', '/api/storage/volumes', {
      name: 'clone_a', svm: { name: 'svm0' }, clone: { is_flexclone: true, parent_volume: { name: 'vol_a' }, parent_snapshot: { name: 'snap1' } },
    });
    if (clone.status === 202) expect((await waitJob(clone.json.job._links.self.href)).state).toBe('success');
    const c = (await api('GET', '/api/storage/volumes?name=clone_a&fields=clone')).json.records[0];
    expect(c.clone.is_flexclone).toBe(true);
    // the parent cannot be deleted while the clone depends on it
    const del = await api('DELETE', `/api/storage/volumes/${vol.uuid}`);
    const delResult = del.status === 202 ? await waitJob(del.json.job._links.self.href) : del.json;
    expect(JSON.stringify(delResult)).toMatch(/failure|error/);
    const split = await api('PATCH', `/api/storage/volumes/${c.uuid}`, { clone: { split_initiated: true } });
    expect(split.status).toBe(202);
    expect((await waitJob(split.json.job._links.self.href)).state).toBe('success');
    const after = (await api('GET', `/api/storage/volumes/${c.uuid}?fields=clone`)).json;
    expect(after.clone?.is_flexclone ?? false).toBe(false);
  });

  it('pages with max_records and _links.next', async () => {
    for (const n of ['vol_b', 'vol_c', 'vol_d']) {
      const r = await api('POST', '/api/storage/volumes', { name: n, svm: { name: 'svm0' }, size: 64 * 1024 * 1024 });
      await waitJob(r.json.job._links.self.href);
    }
    const names: string[] = [];
    let next: string | undefined = '/api/storage/volumes?max_records=2';
    let pages = 0;
    while (next && pages < 20) {
      const page: { json: any } = await api('GET', next);
      names.push(...page.json.records.map((r: { name: string }) => r.name));
      next = page.json._links?.next?.href;
      pages++;
    }
    expect(pages).toBeGreaterThan(1);
    expect(new Set(names)).toEqual(new Set(['vol_a', 'clone_a', 'vol_b', 'vol_c', 'vol_d']));
  });
});
