/**
 * The control API over HTTPS (`offload serve --listen … --tls-cert … --tls-key …`) against a real
 * service: the CLI reaches it with https:// and the CA in OFFLOAD_CA; a client that does not trust
 * the certificate, or speaks plain HTTP to it, is told why; bad TLS flags are usage errors.
 * Credentials: test/support/tls/ (make-certs.sh).
 */
import { randomBytes } from 'node:crypto';
import { copyFileSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { request } from 'node:https';
import { connect as connectTcp } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectBroker } from '../../core/index.js';
import { offload, serve, setup, until, type ServiceChild, type Setup } from './service-helpers.js';

const CREDS = join(import.meta.dirname, '../support/tls');
const CA = join(CREDS, 'client', 'ca-cert.pem');
const CERT = join(CREDS, 'server', 'server-cert.pem');
const KEY = join(CREDS, 'server', 'server-key.pem');
const TOKEN = randomBytes(24).toString('hex');

/** GET over HTTPS trusting the test CA: status and body. */
function get(url: string, token?: string): Promise<{ status: number; body: string }> {
  return new Promise((done, fail) => {
    const req = request(url, { ca: readFileSync(CA), headers: token ? { authorization: `Bearer ${token}` } : {} }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (d: string) => { body += d; }).on('end', () => done({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', fail);
    req.end();
  });
}

describe('offload serve over HTTPS', () => {
  let s: Setup;
  let service: ServiceChild;
  let https: string;
  let tokensFile: string;
  const client = (address: string, args: string[], env: NodeJS.ProcessEnv = {}) => offload(s, ['--server', address, ...args], { OFFLOAD_TOKEN: TOKEN, OFFLOAD_CA: CA, ...env });

  beforeAll(async () => {
    s = setup();
    tokensFile = join(s.dir, 'tokens.yaml');
    writeFileSync(tokensFile, `tokens:\n  - { token: ${TOKEN}, principal: ops, role: admin }\n`, { mode: 0o600 });
    service = await serve(s, ['--listen', '127.0.0.1:0', '--tokens', tokensFile, '--tls-cert', CERT, '--tls-key', KEY]);
    expect(service.addresses).toEqual([`unix:${s.socket}`, expect.stringMatching(/^https:\/\/127\.0\.0\.1:\d+$/)]);
    https = service.addresses[1]!;
  });

  afterAll(async () => {
    expect(await service.stop()).toBe(0);
    rmSync(s.dir, { recursive: true, force: true });
  });

  it('the CLI works through https:// with the CA in OFFLOAD_CA, by address and by name', async () => {
    expect((await client(https, ['volume', 'create', 'local/v1', '16M'])).code).toBe(0);
    const byName = https.replace('127.0.0.1', 'localhost');
    const list = await client(byName, ['--json', 'volume', 'list', 'local']);
    expect(list.code).toBe(0);
    expect((JSON.parse(list.out) as { name: string }[]).map((v) => v.name)).toEqual(['v1']);
    // The library's client too, with the CA given as PEM.
    const api = await connectBroker(https, { token: TOKEN, ca: readFileSync(CA) });
    try {
      expect(api.principal).toEqual({ id: 'ops', role: 'admin' });
    } finally {
      await api.close();
    }
  });

  it('tokens still decide: the API description is public, metrics need a token (401 without)', async () => {
    expect((await get(`${https}/openapi.json`)).status).toBe(200);
    expect((await get(`${https}/metrics`)).status).toBe(401);
    const m = await get(`${https}/metrics`, TOKEN);
    expect(m.status).toBe(200);
    expect(m.body).toMatch(/offload_http_request/);
  });

  it('a client without the CA is told the certificate is not trusted; plain HTTP to it fails; a bad OFFLOAD_CA is a config error', async () => {
    const untrusted = await client(https, ['backends'], { OFFLOAD_CA: '' });
    expect(untrusted.code).toBe(1);
    expect(untrusted.err).toMatch(/BackendUnavailable: cannot reach the service at https:\/\/127\.0\.0\.1:\d+: .*certificate/);
    expect(untrusted.err).toMatch(/OFFLOAD_CA/);
    const plain = await client(https.replace('https:', 'http:'), ['backends']);
    expect(plain.code).toBe(1);
    expect(plain.err).toMatch(/BackendUnavailable: cannot reach the service at http:/);
    const missing = await client(https, ['backends'], { OFFLOAD_CA: join(s.dir, 'no-such-ca.pem') });
    expect(missing.code).toBe(2);
    expect(missing.err).toMatch(/OFFLOAD_CA: cannot read .*no-such-ca\.pem: ENOENT/);
    const notCa = await client(https, ['backends'], { OFFLOAD_CA: KEY });
    expect(notCa.code).toBe(2);
    expect(notCa.err).toMatch(/OFFLOAD_CA: .*server-key\.pem holds no certificate/);
    // Read for https:// only: the unix socket works whatever it names.
    expect((await client(service.addresses[0]!, ['backends'], { OFFLOAD_CA: join(s.dir, 'no-such-ca.pem') })).code).toBe(0);
  });

  it('https:// to a service without TLS says so', async () => {
    const plain = createHttpServer((_req, res) => res.end('{}'));
    await new Promise<void>((r) => plain.listen(0, '127.0.0.1', r));
    try {
      const r = await client(`https://127.0.0.1:${(plain.address() as { port: number }).port}`, ['backends']);
      expect(r.code).toBe(1);
      expect(r.err).toMatch(/does not answer with TLS: use http:\/\//);
    } finally {
      plain.close();
    }
  });

  it('SIGTERM stops a service whose TCP clients hold connections without a request, over HTTP and HTTPS', async () => {
    const stopped = await Promise.all([[], ['--tls-cert', CERT, '--tls-key', KEY]].map(async (tls, i) => {
      const other = await serve(s, ['--socket', join(s.dir, `silent-${i}.sock`), '--listen', '127.0.0.1:0', '--tokens', tokensFile, ...tls]);
      const silent = connectTcp(Number(new URL(other.addresses[1]!).port), '127.0.0.1');
      silent.on('error', () => undefined);
      await new Promise((r) => silent.once('connect', r));
      const code = await other.stop(); // before: held until the client left (HTTP) or the TLS handshake timed out (120 s)
      silent.destroy();
      return code;
    }));
    expect(stopped).toEqual([0, 0]);
  });

  it('bad TLS flags are usage errors (exit 2), before anything listens', async () => {
    const cases: [string[], RegExp][] = [
      [['--listen', '127.0.0.1:0', '--tokens', tokensFile, '--tls-cert', CERT], /--tls-cert and --tls-key go together/],
      [['--tls-cert', CERT, '--tls-key', KEY], /are for TCP \(--listen\)/],
      [['--listen', '127.0.0.1:0', '--tokens', tokensFile, '--tls-cert', CERT, '--tls-key', join(CREDS, 'client', 'client-key.pem')], /cannot be used/],
      [['--listen', '127.0.0.1:0', '--tokens', tokensFile, '--tls-cert', join(s.dir, 'nope.pem'), '--tls-key', KEY], /--tls-cert: cannot read .*nope\.pem: ENOENT/],
      [['--listen', '127.0.0.1:0', '--tokens', tokensFile, '--tls-client-ca', CA], /--tls-client-ca and --tls-client-crl go with --tls-cert and --tls-key/],
      [['--listen', '127.0.0.1:0', '--tokens', tokensFile, '--tls-cert', CERT, '--tls-key', KEY, '--tls-client-crl', CA], /--tls-client-crl goes with --tls-client-ca/],
      [['--listen', '127.0.0.1:0', '--tokens', tokensFile, '--tls-cert', CERT, '--tls-key', KEY, '--tls-client-ca', KEY], /--tls-client-ca: .* holds no certificate/],
      [['--listen', '127.0.0.1:0', '--tokens', tokensFile, '--tls-cert', CERT, '--tls-key', KEY, '--tls-client-ca', CA, '--tls-client-crl', CA], /--tls-client-crl: .* holds no revocation list/],
    ];
    for (const [args, message] of cases) {
      const r = await offload(s, ['serve', '--socket', join(s.dir, 'other.sock'), ...args]);
      expect(r.code).toBe(2);
      expect(r.err).toMatch(message);
    }
  });
});

describe('offload serve over HTTPS with client certificates (--tls-client-ca)', () => {
  let s: Setup;
  let service: ServiceChild;
  let https: string;
  const cert = (who: string) => ({ cert: readFileSync(join(CREDS, who, 'client-cert.pem')), key: readFileSync(join(CREDS, who, 'client-key.pem')) });
  const env = (who: string) => ({ OFFLOAD_CA: CA, OFFLOAD_CERT: join(CREDS, who, 'client-cert.pem'), OFFLOAD_KEY: join(CREDS, who, 'client-key.pem') });
  const crl = () => join(s.dir, 'client-crl.pem');
  let tokensFile: string;
  const entries = (aliceExpires?: string) => `tokens:\n  - { token: ${TOKEN}, principal: ops, role: admin }\n  - { certificate: alice, principal: robot, role: tenant${aliceExpires ? `, expires: "${aliceExpires}"` : ''} }\n`
    + '  - { certificate: mallory, principal: mal, role: admin }\n  - { certificate: eve, principal: evil, role: admin }\n'
    + '  - { certificate: "URI:spiffe://offload.test/kvm9", principal: kvm9, role: tenant }\n';
  async function hangUp(): Promise<void> {
    const before = service.err().split('SIGHUP: reloaded').length;
    service.child.kill('SIGHUP');
    await until('the service says it reloaded', () => service.err().split('SIGHUP: reloaded').length > before);
  }

  beforeAll(async () => {
    s = setup();
    tokensFile = join(s.dir, 'tokens.yaml');
    // alice's certificate (of the test CA) stands for the tenant robot; mallory's is named too, but
    // another CA signed it; eve's, of the CA and named, is revoked by the CA's list: neither counts.
    writeFileSync(tokensFile, entries(), { mode: 0o600 });
    copyFileSync(join(CREDS, 'server-crl', 'ca-crl.pem'), crl());
    service = await serve(s, ['--listen', '127.0.0.1:0', '--tokens', tokensFile, '--tls-cert', CERT, '--tls-key', KEY, '--tls-client-ca', CA, '--tls-client-crl', crl()]);
    https = service.addresses[1]!;
  });

  afterAll(async () => {
    expect(await service.stop()).toBe(0);
    rmSync(s.dir, { recursive: true, force: true });
  });

  it('a client certificate the tokens file names is its principal, without a token; a token, when sent, decides', async () => {
    const robot = await connectBroker(https, { ca: readFileSync(CA), ...cert('client') });
    try {
      expect(robot.principal).toEqual({ id: 'robot', role: 'tenant' });
      await robot.volumes.create('local/r1', { sizeBytes: 1 << 20 });
    } finally {
      await robot.close();
    }
    const withToken = await connectBroker(https, { ca: readFileSync(CA), token: TOKEN, ...cert('client') });
    try {
      expect(withToken.principal).toEqual({ id: 'ops', role: 'admin' });
    } finally {
      await withToken.close();
    }
    // The CLI: OFFLOAD_CERT and OFFLOAD_KEY; the tenant sees its own volume.
    const list = await offload(s, ['--server', https, '--json', 'volume', 'list', 'local'], env('client'));
    expect(list.code, list.err).toBe(0);
    expect((JSON.parse(list.out) as { name: string; owner: string }[]).map((v) => [v.name, v.owner])).toEqual([['r1', 'robot']]);
  });

  it('a certificate with no common name is named by its subject alternative names (URI:…, DNS:…)', async () => {
    const kvm9 = await connectBroker(https, { ca: readFileSync(CA), ...cert('san') });
    try {
      expect(kvm9.principal).toEqual({ id: 'kvm9', role: 'tenant' });
    } finally {
      await kvm9.close();
    }
  });

  it("a certificate the CA's list revokes, one of another CA, or none: 401; bad OFFLOAD_CERT/OFFLOAD_KEY are config errors", async () => {
    for (const who of ['revoked', 'stranger']) {
      await expect(connectBroker(https, { ca: readFileSync(CA), ...cert(who) })).rejects.toMatchObject({
        code: 'PermissionDenied', message: 'a bearer token is needed (Authorization: Bearer TOKEN), or a client certificate the tokens file names',
      });
    }
    await expect(connectBroker(https, { ca: readFileSync(CA) })).rejects.toMatchObject({ code: 'PermissionDenied' });
    const eve = await offload(s, ['--server', https, 'volume', 'list', 'local'], env('revoked'));
    expect(eve.code).not.toBe(0);
    expect(eve.err).toMatch(/PermissionDenied: a bearer token is needed/);
    const half = await offload(s, ['--server', https, 'volume', 'list', 'local'], { OFFLOAD_CA: CA, OFFLOAD_CERT: join(CREDS, 'client', 'client-cert.pem') });
    expect(half.code).toBe(2);
    expect(half.err).toMatch(/OFFLOAD_CERT and OFFLOAD_KEY go together/);
    const mixed = await offload(s, ['--server', https, 'volume', 'list', 'local'], { ...env('client'), OFFLOAD_KEY: join(CREDS, 'revoked', 'client-key.pem') });
    expect(mixed.code).toBe(2);
    expect(mixed.err).toMatch(/OFFLOAD_CERT\/OFFLOAD_KEY cannot be used/);
  });

  it("on SIGHUP, an older list of the CA (issued before eve was revoked) or another CA's is refused, and eve stays refused", async () => {
    for (const [folder, why] of [['old-crl', /it was issued 2020-01-01T00:00:00\.000Z, before the one in use/], ['other-crl', /it has no list of an issuer the one in use has/]] as const) {
      copyFileSync(join(CREDS, folder, 'ca-crl.pem'), crl());
      await hangUp();
      expect(service.err()).toMatch(new RegExp(`SIGHUP: the HTTPS certificate not reloaded, the one in use stays: --tls-client-crl cannot replace the revocation list in use: ${why.source}`));
      await expect(connectBroker(https, { ca: readFileSync(CA), ...cert('revoked') })).rejects.toMatchObject({ code: 'PermissionDenied' });
    }
    copyFileSync(join(CREDS, 'server-crl', 'ca-crl.pem'), crl());
  });

  it("a certificate's entry past its expires is refused with that reason; renewed on SIGHUP, it counts again", async () => {
    writeFileSync(tokensFile, entries('2026-01-01T00:00:00Z'), { mode: 0o600 });
    await hangUp();
    await expect(connectBroker(https, { ca: readFileSync(CA), ...cert('client') })).rejects.toMatchObject({
      code: 'PermissionDenied', message: "the client certificate's entry in the tokens file has expired",
    });
    writeFileSync(tokensFile, entries('2099-01-01T00:00:00Z'), { mode: 0o600 });
    await hangUp();
    const robot = await connectBroker(https, { ca: readFileSync(CA), ...cert('client') });
    expect(robot.principal).toEqual({ id: 'robot', role: 'tenant' });
    await robot.close();
  });

  it('a TLS 1.2 renegotiation cannot put another certificate behind a connection: it is refused', async () => {
    const u = new URL(https);
    const sock = tlsConnect({ host: u.hostname, port: Number(u.port), ca: readFileSync(CA), servername: 'localhost', maxVersion: 'TLSv1.2', ...cert('revoked') });
    await new Promise<void>((resolve, reject) => sock.once('secureConnect', resolve).once('error', reject));
    let text = '';
    const ended = new Promise<string>((done) => {
      sock.on('data', (d: Buffer) => { text += d.toString(); });
      sock.on('error', (e) => done(e.message));
      sock.once('close', () => done('closed'));
    });
    sock.setKeyCert(cert('stranger')); // mallory's: named in the file as an administrator, but another CA's
    // The server refuses to renegotiate (OpenSSL: "no renegotiation") and the connection ends; a
    // service that let it would answer the request below as mallory.
    const renegotiated = await Promise.race([
      new Promise<string>((done) => { if (!sock.renegotiate({ rejectUnauthorized: false }, (e) => done(e ? e.message : 'renegotiated'))) done('not started'); }),
      ended,
    ]);
    if (!sock.destroyed) sock.write('GET /v1/whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n');
    await Promise.race([ended, new Promise((r) => setTimeout(r, 2000))]);
    sock.destroy();
    expect(renegotiated).toMatch(/no renegotiation|closed/);
    expect(text).not.toMatch(/^HTTP\/1\.1 200/);
  });
});
