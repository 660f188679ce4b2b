/**
 * `offload serve` reads its config and credentials again on SIGHUP, without a restart (which would
 * cut every NBD client of its exports): the config file's backends, the tokens file, the HTTPS
 * certificate and the NBD TLS credentials.
 * Each that cannot be read keeps what it had, and the service serves on. Credentials:
 * test/support/tls/ (make-certs.sh; `renewed` is the server's certificate renewed by the same CA).
 */
import { randomBytes, X509Certificate } from 'node:crypto';
import { appendFileSync, copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:tls';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectBroker, type Broker } from '../../core/index.js';
import { HAVE, tool } from '../support/nbd-tools.js';
import { http as plainHttp, offload, serve, setup, until, type ServiceChild, type Setup } from './service-helpers.js';

const CREDS = join(import.meta.dirname, '../support/tls');
const CA = readFileSync(join(CREDS, 'client', 'ca-cert.pem'));
const OPS = randomBytes(24).toString('hex');
const BOB = randomBytes(24).toString('hex');
const CAROL = randomBytes(24).toString('hex');
const MiB = 1024 * 1024;
const fingerprint = (folder: string) => new X509Certificate(readFileSync(join(CREDS, folder, 'server-cert.pem'))).fingerprint256;

/** The certificate an HTTPS listener shows a new connection. */
function servedCertificate(url: string): Promise<string> {
  const u = new URL(url);
  return new Promise((done, fail) => {
    const s = connect({ host: u.hostname, port: Number(u.port), ca: CA, servername: 'localhost' }, () => {
      done(s.getPeerX509Certificate()!.fingerprint256);
      s.end();
    });
    s.on('error', fail);
  });
}

/** Whether a token is let in over HTTPS (the library's client asks who it is): 200, or 401 when refused. */
async function status(url: string, token: string): Promise<number> {
  const api = await connectBroker(url, { token, ca: CA }).catch((e: { code?: string }) => e);
  if ('close' in api) {
    await api.close();
    return 200;
  }
  return api.code === 'PermissionDenied' ? 401 : 0;
}

describe.skipIf(!HAVE.libnbd)('offload serve: SIGHUP reads the credentials again', () => {
  let s: Setup;
  let service: ServiceChild;
  let https: string;
  let tokens: string;
  let admin: Broker;
  const cert = () => join(s.dir, 'https');
  const nbdTls = () => join(s.dir, 'nbd-tls');

  /** SIGHUP, and the line the service says once it has reloaded. */
  async function hangUp(): Promise<string> {
    const before = service.err().split('SIGHUP: reloaded').length;
    service.child.kill('SIGHUP');
    await until('the service says it reloaded', () => service.err().split('SIGHUP: reloaded').length > before);
    return service.err();
  }

  beforeAll(async () => {
    s = setup();
    tokens = join(s.dir, 'tokens.yaml');
    writeFileSync(tokens, `tokens:\n  - { token: ${OPS}, principal: ops, role: admin }\n  - { token: ${CAROL}, principal: carol, role: tenant, nbdClients: [alice, eve] }\n`, { mode: 0o600 });
    mkdirSync(cert());
    for (const f of ['server-cert.pem', 'server-key.pem']) copyFileSync(join(CREDS, 'server', f), join(cert(), f));
    mkdirSync(nbdTls());
    for (const f of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']) copyFileSync(join(CREDS, 'server', f), join(nbdTls(), f));
    appendFileSync(s.config, '\nnbd:\n  tls:\n    x509: ./nbd-tls\n');
    service = await serve(s, ['--listen', '127.0.0.1:0', '--tokens', tokens, '--tls-cert', join(cert(), 'server-cert.pem'), '--tls-key', join(cert(), 'server-key.pem')]);
    https = service.addresses[1]!;
    admin = await connectBroker(service.addresses[0]!);
  });

  afterAll(async () => {
    await admin?.close();
    if (service) expect(await service.stop()).toBe(0);
    rmSync(s.dir, { recursive: true, force: true });
  });

  it("a token added works and one taken away is refused; the renewed certificate is served; a CRL put beside the NBD CA refuses its certificate; a tenant's export narrowed to its new nbdClients; the exports serve on", async () => {
    expect((await offload(s, ['volume', 'create', 'local/disk', '4M'])).code).toBe(0);
    const exported = await admin.exports.start('local/disk', { name: 'disk', readOnly: true, listen: { port: 0 } });
    const size = (who: string, uri = exported.uri) => tool('nbdinfo', ['--size', `${uri}?tls-certificates=${join(CREDS, who)}`]);
    // carol's export admits her two hosts (the binding, as none are named).
    const carol = await connectBroker(https, { token: CAROL, ca: CA });
    await carol.volumes.create('local/c1', { sizeBytes: MiB });
    const hers = await carol.exports.start('local/c1', { readOnly: true, listen: { port: 0 } });
    await carol.close();
    expect(hers.clients).toEqual(['alice', 'eve']);
    expect((await size('client', hers.uri)).status).toBe(0);
    expect((await size('revoked')).status).toBe(0);
    expect(await status(https, OPS)).toBe(200);
    expect(await status(https, BOB)).toBe(401);
    expect(await servedCertificate(https)).toBe(fingerprint('server'));

    writeFileSync(tokens, `tokens:\n  - { token: ${BOB}, principal: bob, role: tenant }\n  - { token: ${CAROL}, principal: carol, role: tenant, nbdClients: [eve] }\n`, { mode: 0o600 });
    for (const f of ['server-cert.pem', 'server-key.pem']) copyFileSync(join(CREDS, 'renewed', f), join(cert(), f));
    expect(await hangUp()).toMatch(/SIGHUP: reloaded the config \(no change\), the tokens file, the HTTPS certificate, the NBD TLS credentials \(1\)\n/);

    expect(await status(https, OPS)).toBe(401);
    const bob = await connectBroker(https, { token: BOB, ca: CA });
    try {
      expect(bob.principal).toEqual({ id: 'bob', role: 'tenant' });
      // The control API's route for the NBD credentials is for administrators; carol's export does not exist for bob.
      await expect(bob.exports.reloadTls()).rejects.toMatchObject({ code: 'PermissionDenied' });
      await expect(bob.exports.setClients('local/c1', ['alice'])).rejects.toMatchObject({ code: 'NotFound', message: 'no export named local/c1' });
    } finally {
      await bob.close();
    }
    expect(await servedCertificate(https)).toBe(fingerprint('renewed'));
    // carol's export: alice is no longer among her hosts, so it does not exist for alice; eve's is served; kept so in the service's file.
    expect((await size('client', hers.uri)).stderr).toMatch(/no export named ['"]local\/c1['"]/);
    expect((await size('revoked', hers.uri)).status).toBe(0);

    // The CA's revocation list put beside it: eve's certificate is refused from the next handshake.
    copyFileSync(join(CREDS, 'server-crl', 'ca-crl.pem'), join(nbdTls(), 'ca-crl.pem'));
    expect(await hangUp()).toMatch(/SIGHUP: reloaded the config \(no change\), the tokens file, the HTTPS certificate, the NBD TLS credentials \(1\)\n/);
    expect((await size('revoked')).status).not.toBe(0);
    expect((await size('client')).status).toBe(0);
    expect(await admin.exports.reloadTls()).toEqual({ reloaded: 1, failed: [] });
    expect((await admin.exports.list()).map((e) => [e.name, e.clients])).toEqual([['disk', undefined], ['local/c1', ['eve']]]);
    const saved = () => (JSON.parse(readFileSync(join(s.dir, 'state', 'hosted-exports.json'), 'utf8')) as { exports: { name: string; clients?: string[] }[] }).exports;
    expect(saved().find((e) => e.name === 'local/c1')?.clients).toEqual(['eve']);
    // Through the CLI: not wider than carol's binding, even for an administrator; --none admits no new client.
    const cli = (args: string[]) => offload(s, ['--server', service.addresses[0]!, ...args]);
    const wider = await cli(['nbd', 'clients', 'local/c1', 'alice']);
    expect(wider.code).not.toBe(0);
    expect(wider.err).toMatch(/carol's exports admit only its NBD clients \(eve\), not alice/);
    expect(await cli(['nbd', 'clients', 'local/c1', '--none'])).toMatchObject({ code: 0, out: 'export local/c1 admits no new client\n' });
    expect(saved().find((e) => e.name === 'local/c1')?.clients).toEqual([]);
    expect((await admin.exports.list()).map((e) => e.name)).toEqual(['disk', 'local/c1']);
    expect(service.child.exitCode).toBeNull();
  });

  it('a tokens file or a certificate that cannot be used is logged and the old one stays; the service serves on', async () => {
    writeFileSync(tokens, 'tokens:\n  - { token: short, principal: bob, role: tenant }\n', { mode: 0o600 });
    writeFileSync(join(cert(), 'server-key.pem'), readFileSync(join(CREDS, 'client', 'client-key.pem')));
    rmSync(join(nbdTls(), 'ca-cert.pem'));
    const err = await hangUp();
    expect(err).toMatch(/SIGHUP: the tokens file not reloaded, the one in use stays: tokens file .*: tokens\[0\]\.token: a token has at least 16 characters/);
    expect(err).toMatch(/SIGHUP: the HTTPS certificate not reloaded, the one in use stays: --tls-cert\/--tls-key cannot be used/);
    expect(err).toMatch(/SIGHUP: NBD TLS credentials not reloaded, the one in use stays: nbd\.tls\.x509: cannot read .*ca-cert\.pem/);
    expect(err).toMatch(/SIGHUP: reloaded the config \(no change\)\n/);
    expect(err).not.toContain('short'); // the bad token is not echoed
    expect(await status(https, BOB)).toBe(200);
    expect(await servedCertificate(https)).toBe(fingerprint('renewed'));
    const list = await plainHttp(service.addresses[0]!, 'GET', '/v1/exports');
    expect(list.status).toBe(200);
    const disk = (list.body as { name: string; uri: string }[]).find((e) => e.name === 'disk')!;
    expect((await tool('nbdinfo', ['--size', `${disk.uri}?tls-certificates=${join(CREDS, 'client')}`])).status).toBe(0); // NBD serves on with what it had
    expect((await tool('nbdinfo', ['--size', `${disk.uri}?tls-certificates=${join(CREDS, 'revoked')}`])).status).not.toBe(0);
    // What an operator alerts on: two SIGHUPs that read everything, then one that read nothing.
    const metrics = (await plainHttp(service.addresses[0]!, 'GET', '/metrics')).text;
    for (const kind of ['tokens', 'https', 'nbd-tls']) {
      expect(metrics).toContain(`offload_credential_reloads_total{credentials="${kind}",result="ok"} 2`);
      expect(metrics).toContain(`offload_credential_reloads_total{credentials="${kind}",result="failed"} 1`);
    }
    expect(service.child.exitCode).toBeNull();
  });

  it('the config file read again: a pool added is used at once; one left out stays while its export serves, and goes once it stops; a file that does not parse keeps the one in use', async () => {
    const original = readFileSync(s.config, 'utf8');
    const withExtra = original.replace('backends:\n', 'backends:\n  - name: extra\n    kind: qcow2\n    path: ./extra\n');
    expect(withExtra).not.toBe(original);
    mkdirSync(join(s.dir, 'extra'));
    const cli = (args: string[]) => offload(s, ['--server', service.addresses[0]!, ...args]);
    try {
      writeFileSync(s.config, withExtra);
      expect(await hangUp()).toMatch(/SIGHUP: reloaded the config \(extra added\)\n/);
      expect(await cli(['volume', 'create', 'extra/v', '1M'])).toMatchObject({ code: 0 });
      const exp = await admin.exports.start('extra/v', { name: 'extra-disk', readOnly: true, listen: { port: 0 } });
      writeFileSync(s.config, original);
      expect(await hangUp()).toMatch(/SIGHUP: reloaded the config \(extra kept\)/);
      expect(service.err()).toMatch(/backend extra stays as it is: it is no longer configured, but it is in use here \(nothing new starts on it\): nbd export extra-disk of extra\/v/);
      expect((await cli(['volume', 'list', 'extra'])).out).toContain('v');
      await exp.stop();
      expect(await hangUp()).toMatch(/SIGHUP: reloaded the config \(extra removed\)/);
      expect((await cli(['volume', 'list', 'extra'])).err).toMatch(/backend "extra" is not configured/);

      writeFileSync(s.config, `${original}\n  - [unclosed`);
      expect(await hangUp()).toMatch(/SIGHUP: the config file not reloaded, the one in use stays: config file .*offload\.yaml is not valid YAML/);
      expect(await cli(['volume', 'create', 'local/after-bad-config', '1M'])).toMatchObject({ code: 0 });
      await expect(admin.reconfigure(s.config)).rejects.toMatchObject({ code: 'Unsupported', hint: expect.stringMatching(/SIGHUP/) });
      const metrics = (await plainHttp(service.addresses[0]!, 'GET', '/metrics')).text;
      expect(metrics).toContain('offload_credential_reloads_total{credentials="config",result="ok"} 6');
      expect(metrics).toContain('offload_credential_reloads_total{credentials="config",result="failed"} 1');
    } finally {
      writeFileSync(s.config, original);
    }
    expect(service.child.exitCode).toBeNull();
  });

  it('started again, the service brings back its exports as their clients now stand: one that admitted no client admits none, until its clients are set again; an expired token is told so', async () => {
    writeFileSync(tokens, `tokens:\n  - { token: ${BOB}, principal: bob, role: tenant, expires: "2026-01-01T00:00:00Z" }\n`, { mode: 0o600 });
    copyFileSync(join(CREDS, 'server', 'ca-cert.pem'), join(nbdTls(), 'ca-cert.pem'));
    copyFileSync(join(CREDS, 'renewed', 'server-key.pem'), join(cert(), 'server-key.pem'));
    await admin.close();
    expect(await service.stop()).toBe(0);
    service = await serve(s, ['--listen', '127.0.0.1:0', '--tokens', tokens, '--tls-cert', join(cert(), 'server-cert.pem'), '--tls-key', join(cert(), 'server-key.pem')], { OFFLOAD_LOG: 'info' });
    admin = await connectBroker(service.addresses[0]!);
    https = service.addresses[1]!;
    expect((await admin.exports.list()).map((e) => [e.name, e.clients])).toEqual([['disk', undefined], ['local/c1', []]]);
    expect(service.err()).toMatch(/hosted export local\/c1 admits no client, as when the service stopped/);
    const c1 = (await admin.exports.list()).find((e) => e.name === 'local/c1')!;
    const size = () => tool('nbdinfo', ['--size', `${c1.uri}?tls-certificates=${join(CREDS, 'client')}`]);
    expect((await size()).stderr).toMatch(/no export named ['"]local\/c1['"]/);
    expect((await admin.exports.setClients('local/c1', ['alice'])).clients).toEqual(['alice']);
    expect((await size()).stdout.trim()).toBe(String(MiB));
    await expect(connectBroker(https, { token: BOB, ca: CA })).rejects.toMatchObject({ code: 'PermissionDenied', message: 'the bearer token has expired' });
    await expect(connectBroker(https, { token: OPS, ca: CA })).rejects.toMatchObject({ code: 'PermissionDenied', message: 'the bearer token is not known' });
  });
});
