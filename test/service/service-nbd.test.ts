/**
 * NBD exports hosted by the service (`offload --server … nbd REF`): the command prints the URI and
 * returns; the export serves real clients (qemu-img, qemu-io) after the client is gone, comes back
 * at the same URI after the service restarts, and stays gone once stopped. One that cannot start
 * again is logged and dropped, and the service serves on.
 */
import { randomBytes } from 'node:crypto';
import { appendFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HAVE, ok, qemuIo, tool } from '../support/nbd-tools.js';
import { http, offload, serve, setup, until, type ServiceChild, type Setup } from './service-helpers.js';

const MiB = 1024 * 1024;

describe.skipIf(!HAVE.qemu)('NBD exports hosted by the service', () => {
  let s: Setup;
  let service: ServiceChild;
  const client = (...args: string[]) => offload(s, ['--server', service.addresses[0]!, ...args]);
  const hostedFile = () => JSON.parse(readFileSync(join(s.dir, 'state', 'hosted-exports.json'), 'utf8')) as { exports: { name: string }[] };

  beforeAll(async () => {
    s = setup();
    service = await serve(s);
    expect((await client('volume', 'create', 'local/vm1', '64M')).code).toBe(0);
    expect((await client('volume', 'create', 'local/gone', '16M')).code).toBe(0);
  });

  afterAll(async () => {
    if (service.child.exitCode === null) await service.stop();
    rmSync(s.dir, { recursive: true, force: true });
  });

  it('outlive the client and come back after a restart; `nbd stop` ends them for good', async () => {
    const started = await client('nbd', 'local/vm1', '--port', '0');
    expect(started.code).toBe(0);
    const uri = started.out.trim();
    expect(uri).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+\/local\/vm1$/);
    expect(started.err).toMatch(/serves local\/vm1 as local\/vm1; `offload nbd stop local\/vm1` stops it/);
    const sock = join(s.dir, 'gone.sock');
    const other = await client('--json', 'nbd', 'local/gone', '--socket', sock, '--read-only', '--name', 'gone');
    expect(JSON.parse(other.out)).toEqual({ name: 'gone', ref: 'local/gone', uri: `nbd+unix:///gone?socket=${sock}`, readOnly: true });

    await qemuIo(uri, ['write -P 0x5a 0 1M']);
    expect(JSON.parse((await client('--json', 'nbd', 'list')).out)).toEqual(expect.arrayContaining([
      expect.objectContaining({ name: 'local/vm1', uri, readOnly: false, pid: service.child.pid }),
      expect.objectContaining({ name: 'gone', readOnly: true }),
    ]));
    // The exported volume is locked as with `offload nbd`.
    expect((await client('volume', 'delete', 'local/vm1')).err).toMatch(/Busy.*export local\/vm1/);

    // Restart, with local/gone deleted meanwhile: vm1 comes back at the same URI, gone is dropped.
    expect(await service.stop()).toBe(0);
    expect((await offload(s, ['volume', 'delete', 'local/gone'])).code).toBe(0);
    service = await serve(s);
    await until('the dropped export is logged', () => /hosted export gone of local\/gone cannot start again, dropped: NotFound/.test(service.err()));
    const info = JSON.parse(await ok('qemu-img', ['info', '--output=json', uri])) as { 'virtual-size': number };
    expect(info['virtual-size']).toBe(64 * MiB);
    await qemuIo(uri, ['read -P 0x5a 0 1M', 'read -P 0 1M 1M']);
    expect(hostedFile().exports.map((e) => e.name)).toEqual(['local/vm1']);

    const stopped = await client('nbd', 'stop', 'local/vm1');
    expect(stopped.code).toBe(0);
    expect(JSON.parse((await client('--json', 'nbd', 'list')).out)).toEqual([]);
    expect(hostedFile().exports).toEqual([]);
    expect(await service.stop()).toBe(0);
    service = await serve(s);
    expect(JSON.parse((await client('--json', 'nbd', 'list')).out)).toEqual([]);
  });
});

describe.skipIf(!HAVE.qemu || !HAVE.libnbd)('NBD exports of a service with nbd.tls in its config', () => {
  let s: Setup;
  let service: ServiceChild;
  const client = (...args: string[]) => offload(s, ['--server', service.addresses[0]!, ...args]);

  beforeAll(async () => {
    s = setup();
    // A relative PSK file (from the config's folder); qemu's tls-creds-psk reads keys.psk in a folder.
    mkdirSync(join(s.dir, 'psk'));
    writeFileSync(join(s.dir, 'psk', 'keys.psk'), `alice:${randomBytes(32).toString('hex')}\nbob:${randomBytes(32).toString('hex')}\n`);
    appendFileSync(s.config, '\nnbd:\n  tls:\n    psk: ./psk/keys.psk\n');
    service = await serve(s);
    expect((await client('volume', 'create', 'local/vm1', '16M')).code).toBe(0);
  });

  afterAll(async () => {
    if (service.child.exitCode === null) await service.stop();
    rmSync(s.dir, { recursive: true, force: true });
  });

  it('serves them with TLS only: the URI is nbds://, qemu-io writes with the key, nbdinfo reads, a plain client is refused', async () => {
    const started = await client('nbd', 'local/vm1', '--port', '0');
    expect(started.code).toBe(0);
    const uri = started.out.trim();
    expect(uri).toMatch(/^nbds:\/\/127\.0\.0\.1:\d+\/local\/vm1$/);
    const port = /:(\d+)\//.exec(uri)![1]!;
    const keys = join(s.dir, 'psk', 'keys.psk');
    const out = await ok('qemu-io', ['--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${join(s.dir, 'psk')},username=alice`,
      '--image-opts', `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},export=local/vm1,tls-creds=tls0`,
      '-c', 'write -P 0x6b 0 1M', '-c', 'read -P 0x6b 0 1M']);
    expect(out).not.toMatch(/fail|error/i);
    const copy = join(s.dir, 'copy.raw');
    await ok('nbdcopy', [`${uri.replace('nbds://', 'nbds://alice@')}?tls-psk-file=${keys}`, copy]);
    expect(readFileSync(copy).subarray(0, 1 << 20).equals(Buffer.alloc(1 << 20, 0x6b))).toBe(true);
    const plain = await tool('qemu-img', ['info', uri.replace('nbds://', 'nbd://')]);
    expect(plain.stderr).toMatch(/TLS negotiation required/);
    expect((await client('nbd', 'stop', 'local/vm1')).code).toBe(0);
  });
  it('a tenant bound to its NBD clients (the tokens file\'s nbdClients): its exports admit only those, also when an administrator acts as it; it cannot name others; a restart keeps what the file still allows', async () => {
    const keys = join(s.dir, 'psk', 'keys.psk');
    const tokens = join(s.dir, 'tokens.yaml');
    const TINA = randomBytes(16).toString('hex');
    const OPS = randomBytes(16).toString('hex');
    const tokensFile = (tina: string) => writeFileSync(tokens, ['tokens:', `  - { token: ${TINA}, principal: tina, role: tenant${tina} }`, `  - { token: ${OPS}, principal: ops, role: admin }`].join('\n'), { mode: 0o600 });
    tokensFile(', nbdClients: [bob]');
    const restart = async () => {
      expect(await service.stop()).toBe(0);
      service = await serve(s, ['--listen', '127.0.0.1:0', '--tokens', tokens]);
    };
    await restart();
    const tina = (...args: string[]) => offload(s, ['--server', service.addresses[1]!, ...args], { OFFLOAD_TOKEN: TINA });
    expect((await tina('volume', 'create', 'local/t1', '8M')).code).toBe(0);
    const started = await tina('nbd', 'local/t1', '--port', '0');
    expect(started.code, started.err).toBe(0);
    const uri = started.out.trim();
    const as = (who: string, u = uri) => `${u.replace('nbds://', `nbds://${who}@`)}?tls-psk-file=${keys}`;
    const admits = async (u: string, who: string[], not: string[]) => {
      for (const w of who) expect((await ok('nbdinfo', ['--size', as(w, u)])).trim()).toBe(String(8 * MiB));
      for (const w of not) expect((await tool('nbdinfo', ['--size', as(w, u)])).stderr).toMatch(/no export named/);
    };
    await admits(uri, ['bob'], ['alice']);
    const wider = await tina('nbd', 'local/t1', '--name', 't1-alice', '--port', '0', '--clients', 'bob,alice');
    expect(wider.code).toBe(1);
    expect(wider.err).toMatch(/PermissionDenied: tina's exports admit only its NBD clients \(bob\), not alice/);
    // An administrator acting as tina (Offload-As) is bound as tina is.
    expect((await tina('volume', 'create', 'local/t2', '8M')).code).toBe(0);
    const byAdmin = await http(service.addresses[1]!, 'POST', '/v1/exports', { token: OPS, headers: { 'offload-as': 'tina' }, body: JSON.stringify({ ref: 'local/t2', name: 't2-ops', listen: { port: 0 } }) });
    expect(byAdmin.status).toBe(200);
    expect(byAdmin.body).toMatchObject({ clients: ['bob'] });
    await admits((byAdmin.body as { uri: string }).uri, ['bob'], ['alice']);
    expect((await client('nbd', 'stop', 't2-ops')).code).toBe(0);
    expect(await tina('--json', 'nbd', 'list').then((r) => JSON.parse(r.out) as unknown)).toEqual([expect.objectContaining({ name: 'local/t1', clients: ['bob'] })]);
    expect((await tina('nbd', 'list')).out).toMatch(/^local\/t1 +local\/t1 +read-write +nbds:\S+ +tina +bob +\d+/m);
    // Restarted with tina unbound: the export keeps the clients it started with.
    tokensFile('');
    await restart();
    await until('the export is back', async () => (await client('--json', 'nbd', 'list').then((r) => JSON.parse(r.out) as { name: string }[])).some((e) => e.name === 'local/t1'));
    await admits(uri, ['bob'], ['alice']);
    // Restarted with tina bound to alice only: bob is no longer hers, and nobody else may open it: it comes back admitting none.
    tokensFile(', nbdClients: [alice]');
    await restart();
    await until('logged', () => /hosted export local\/t1 admits no client: none of its clients \(bob\) is among tina's NBD clients \(alice\) any more/.test(service.err()));
    await until('the export is back', async () => (await client('--json', 'nbd', 'list').then((r) => JSON.parse(r.out) as { name: string }[])).some((e) => e.name === 'local/t1'));
    expect(await client('--json', 'nbd', 'list').then((r) => JSON.parse(r.out) as unknown)).toEqual([expect.objectContaining({ name: 'local/t1', clients: [] })]);
    await admits(uri, [], ['alice', 'bob']);
  });
});
