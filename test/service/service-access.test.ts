/**
 * The control API over TCP with tokens, against a real `offload serve`: who may do what (a tenant
 * sees and touches only its own volumes and jobs; another's are NotFound, as if absent; no token or
 * an unknown one is 401), the requests it refuses (bad JSON, wrong types, unknown fields: 400
 * InvalidArgument), /openapi.json (every route of the table) and /metrics (administrators).
 */
import { chmodSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { tenant } from '../../core/index.js';
import { connectBroker } from '../../core/service/client.js';
import { ROUTES } from '../../core/service/routes.js';
import { http, offload, offloadChild, serve, setup, type ServiceChild, type Setup } from './service-helpers.js';

const TOKENS = { admin: 'admin-0123456789abcdef', alice: 'alice-0123456789abcdef', bob: 'bob-0123456789abcdef0' };

describe('offload serve over TCP: tokens, tenants, the API description and metrics', () => {
  let s: Setup;
  let service: ServiceChild;
  let tcp: string;
  let tokensFile: string;
  const as = (who: keyof typeof TOKENS, args: string[]) => offload(s, ['--server', tcp, ...args], { OFFLOAD_TOKEN: TOKENS[who] });

  beforeAll(async () => {
    s = setup();
    tokensFile = join(s.dir, 'tokens.yaml');
    writeFileSync(tokensFile, [
      'tokens:',
      `  - { token: ${TOKENS.admin}, principal: ops, role: admin }`,
      `  - { token: ${TOKENS.alice}, principal: alice, role: tenant }`,
      `  - { token: ${TOKENS.bob}, principal: bob, role: tenant }`,
    ].join('\n'), { mode: 0o600 });
    service = await serve(s, ['--listen', '127.0.0.1:0', '--tokens', tokensFile]);
    expect(service.addresses).toEqual([`unix:${s.socket}`, expect.stringMatching(/^http:\/\/127\.0\.0\.1:\d+$/)]);
    tcp = service.addresses[1]!;
  });

  afterAll(async () => {
    expect(await service.stop()).toBe(0);
    rmSync(s.dir, { recursive: true, force: true });
  });

  it('no token or an unknown one: 401, and the CLI says so (exit 1)', async () => {
    for (const token of [undefined, 'not-a-token-of-ours-at-all']) {
      const r = await http(tcp, 'GET', '/v1/backends', token ? { token } : {});
      expect(r.status).toBe(401);
      expect(r.body).toMatchObject({ error: { code: 'PermissionDenied', message: expect.stringMatching(/bearer token/) } });
    }
    const cli = await offload(s, ['--server', tcp, 'backends']);
    expect(cli.code).toBe(1);
    expect(cli.err).toMatch(/^offload: PermissionDenied: a bearer token is needed/);
    expect(cli.out + cli.err).not.toContain(TOKENS.alice);
  });

  it('a tenant sees and touches only its own: another tenant\'s volume and job are NotFound, as if absent', async () => {
    expect((await as('alice', ['volume', 'create', 'local/alice1', '16M'])).code).toBe(0);
    expect((await as('admin', ['volume', 'create', 'local/ops1', '16M'])).code).toBe(0);
    const mine = await as('alice', ['--json', 'volume', 'list', 'local']);
    expect((JSON.parse(mine.out) as { name: string; owner: string }[]).map((v) => [v.name, v.owner])).toEqual([['alice1', 'alice']]);
    const all = await as('admin', ['--json', 'volume', 'list', 'local']);
    expect((JSON.parse(all.out) as { name: string }[]).map((v) => v.name).sort()).toEqual(['alice1', 'ops1']);

    const other = await as('bob', ['volume', 'show', 'local/alice1']);
    const absent = await as('bob', ['volume', 'show', 'local/nothing']);
    expect(other.code).toBe(1);
    expect(other.err).toBe(absent.err.replace('nothing', 'alice1'));
    // Deleting what does not exist succeeds (CSI): for bob, alice's volume does not exist — and stays.
    expect((await as('bob', ['volume', 'delete', 'local/alice1'])).code).toBe(0);
    expect((await as('alice', ['volume', 'show', 'local/alice1'])).code).toBe(0);
    expect((await http(tcp, 'GET', '/v1/volumes/local/alice1', { token: TOKENS.bob })).status).toBe(404);
    // Acting as another tenant is for administrators.
    expect((await http(tcp, 'GET', '/v1/volumes/local/alice1', { token: TOKENS.bob, headers: { 'offload-as': 'alice' } })).status).toBe(403);
    expect((await http(tcp, 'GET', '/v1/volumes/local/alice1', { token: TOKENS.admin, headers: { 'offload-as': 'alice' } })).status).toBe(200);

    const started = await as('alice', ['--json', 'clone', 'local/alice1', 'local/alice2', '--full', '--detach']);
    expect(started.code).toBe(0);
    const job = JSON.parse(started.out) as { id: string; owner: string };
    expect(job.owner).toBe('alice');
    expect((await as('alice', ['jobs', 'wait', job.id])).code).toBe(0);
    const bobs = await as('bob', ['jobs', 'show', job.id]);
    expect(bobs.code).toBe(1);
    expect(bobs.err).toMatch(new RegExp(`NotFound: job ${job.id} does not exist`));
    expect(JSON.parse((await as('bob', ['--json', 'jobs', 'list'])).out)).toEqual([]);
    expect((await http(tcp, 'POST', `/v1/jobs/${job.id}/dismiss`, { token: TOKENS.bob })).status).toBe(404);
    expect((JSON.parse((await as('admin', ['--json', 'jobs', 'list'])).out) as { id: string }[]).map((j) => j.id)).toContain(job.id);
  });

  it('refuses malformed requests with 400 InvalidArgument naming the problem; an unknown route is 404', async () => {
    const put = (body: string) => http(tcp, 'PUT', '/v1/volumes/local/v9', { token: TOKENS.admin, body });
    const cases: [string, RegExp][] = [
      ['{not json', /not valid JSON/],
      ['{"sizeBytes": "1G"}', /body: sizeBytes: expected number, got string/],
      ['{"sizeBytes": 1048576, "color": "red"}', /unknown field "color"/],
      ['[1]', /expected object, got array/],
    ];
    for (const [body, message] of cases) {
      const r = await put(body);
      expect({ body, status: r.status }).toEqual({ body, status: 400 });
      expect(r.body).toMatchObject({ error: { code: 'InvalidArgument', message: expect.stringMatching(message) } });
    }
    const q = await http(tcp, 'GET', '/v1/jobs?color=red', { token: TOKENS.admin });
    expect(q.status).toBe(400);
    expect(q.body).toMatchObject({ error: { message: expect.stringMatching(/query.*unknown field "color"/) } });
    const none = await http(tcp, 'GET', '/v1/nothing', { token: TOKENS.admin });
    expect(none.status).toBe(404);
    // The broker's own checks answer as embedded: a size of 0 is InvalidArgument from the broker.
    const zero = await put('{"sizeBytes": 0}');
    expect(zero.status).toBe(400);
    expect(zero.body).toMatchObject({ error: { code: 'InvalidArgument', message: 'size of local/v9 must be greater than 0, got 0' } });
  });

  it('/openapi.json describes every route of the table (no token needed)', async () => {
    const r = await http(tcp, 'GET', '/openapi.json');
    expect(r.status).toBe(200);
    const doc = r.body as { openapi: string; paths: Record<string, Record<string, { operationId: string }>> };
    expect(doc.openapi).toMatch(/^3\./);
    const listed = Object.entries(doc.paths).flatMap(([path, ops]) => Object.entries(ops).map(([method, op]) => `${op.operationId} ${method.toUpperCase()} ${path}`));
    const expected = Object.entries(ROUTES).map(([id, route]) => `${id} ${route.method} ${route.path.replace(/:(\w+)/g, '{$1}')}`);
    expect(listed).toEqual(expect.arrayContaining(expected));
    expect(listed).toHaveLength(expected.length + 1); // and /metrics
  });

  it('/metrics: for administrators, with the jobs, bytes, takeovers, fencing and latency metrics', async () => {
    expect((await http(tcp, 'GET', '/metrics', { token: TOKENS.alice })).status).toBe(403);
    const r = await http(tcp, 'GET', '/metrics', { token: TOKENS.admin });
    expect(r.status).toBe(200);
    expect(r.type).toMatch(/^text\/plain/);
    for (const name of ['offload_jobs', 'offload_job_processed_bytes', 'offload_job_takeovers_total', 'offload_job_fencing_rejections_total', 'offload_http_request_duration_seconds_bucket']) {
      expect(r.text).toMatch(new RegExp(`^${name}[{ ]`, 'm'));
    }
    expect(r.text).toMatch(/^offload_jobs\{status="concluded",executor="host"\} 1$/m);
    expect(r.text).toMatch(/^offload_job_processed_bytes\{where="host"\} \d+$/m);
    expect(r.text).toMatch(/offload_http_request_duration_seconds_count\{method="PUT",route="\/v1\/volumes\/:backend\/:name",status="200"\} 2/);
  });

  it('/metrics: the bytes this service\'s jobs processed are a counter, which a dismissed job does not take back (the gauge of the store\'s jobs drops)', async () => {
    const bytes = async () => {
      const text = (await http(tcp, 'GET', '/metrics', { token: TOKENS.admin })).text;
      const value = (re: RegExp) => Number(re.exec(text)?.[1]);
      return { gauge: value(/^offload_job_processed_bytes\{where="host"\} (\d+)$/m), counter: value(/^offload_job_processed_bytes_total\{where="host"\} (\d+)$/m), offloaded: value(/^offload_job_processed_bytes_total\{where="offloaded"\} (\d+)$/m) };
    };
    const before = await bytes();
    const file = join(s.dir, 'data.raw');
    writeFileSync(file, Buffer.alloc(1 << 20, 0x5a));
    const started = await as('admin', ['--json', 'volume', 'import', file, 'local/metered', '--create', '--detach']);
    expect(started.code).toBe(0);
    const job = JSON.parse(started.out) as { id: string };
    expect((await as('admin', ['jobs', 'wait', job.id])).code).toBe(0);
    const after = await bytes();
    expect(after.counter - before.counter).toBe(1 << 20);
    expect(after.gauge - before.gauge).toBe(1 << 20);
    expect(after.offloaded).toBe(0);
    expect((await as('admin', ['jobs', 'dismiss', job.id])).code).toBe(0);
    const dismissed = await bytes();
    expect(dismissed.gauge).toBe(before.gauge);
    expect(dismissed.counter).toBe(after.counter);
  });

  it('the client as a library: the same Broker, tenants by Offload-As, and what cannot cross the wire is Unsupported', async () => {
    const admin = await connectBroker(service.addresses[0]!);
    try {
      expect(admin.principal).toEqual({ id: 'admin', role: 'admin' });
      const alice = admin.as(tenant('alice'));
      expect((await alice.volumes.listAll('local')).map((v) => v.name)).toEqual(expect.arrayContaining(['alice1']));
      expect((await alice.volumes.listAll('local')).every((v) => v.owner === 'alice')).toBe(true);
      await expect(alice.volumes.get('local/ops1')).rejects.toMatchObject({ code: 'NotFound', message: 'volume local/ops1 does not exist' });
      await expect(admin.volumes.open('local/alice1')).rejects.toMatchObject({ code: 'Unsupported', hint: expect.stringMatching(/NBD/) });
      expect(() => admin.backend('local')).toThrow(/cannot cross the control API/);
      const caps = (await admin.backends()).find((b) => b.name === 'local')!.capabilities;
      expect(caps.has('clone.linked')).toBe(true);
    } finally {
      await admin.close();
    }
    await expect(connectBroker(`unix:${join(s.dir, 'nobody.sock')}`)).rejects.toMatchObject({ code: 'BackendUnavailable', message: expect.stringMatching(/cannot reach the service/) });
    await expect(connectBroker('ftp://x')).rejects.toMatchObject({ code: 'InvalidArgument' });
  });

  it('refuses a tokens file others may read, and TCP without tokens (exit 2)', async () => {
    chmodSync(tokensFile, 0o644);
    try {
      const open = offloadChild(s, ['serve', '--socket', join(s.dir, 'other.sock'), '--listen', '127.0.0.1:0', '--tokens', tokensFile]);
      expect(await open.exit).toBe(2);
      expect(open.err()).toMatch(/tokens file .* may be read or written by others \(mode 644\) \(chmod 600/);
      expect(open.err()).not.toContain(TOKENS.admin);
    } finally {
      chmodSync(tokensFile, 0o600);
    }
    const bare = await offload(s, ['serve', '--listen', '127.0.0.1:0']);
    expect(bare.code).toBe(2);
    expect(bare.err).toMatch(/--listen needs --tokens/);
  });
});
