/**
 * NBD exports whose access changes while they serve: TLS credentials read again (NbdTls.reload,
 * broker.exports.reloadTls — what `offload serve` does on SIGHUP) and an export's clients changed
 * (exports.setClients — `offload nbd clients`), against nbdinfo and node's own TLS client, with a
 * client connected before each change. Credentials: test/support/tls/ (make-certs.sh).
 */
import { randomBytes, X509Certificate } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createBroker, silentLogger, type Broker } from '../../core/index.js';
import { NbdServer } from '../../core/export/nbd-server.js';
import { loadNbdTls, readPskFile } from '../../core/export/nbd-tls.js';
import { REP } from '../../core/export/nbd-protocol.js';
import { builtinPlugins } from '../../plugins/index.js';
import { memoryDevice } from '../support/memory-device.js';
import { CMD, go, reply, request, startTls } from '../support/nbd-client.js';
import { HAVE, ok, tool } from '../support/nbd-tools.js';

const MiB = 1024 * 1024;
const CREDS = join(import.meta.dirname, '../support/tls');
const dir = mkdtempSync(join(tmpdir(), 'offload-nbd-access-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function portOf(s: NbdServer): number {
  return (s.address as { port: number }).port;
}

describe.skipIf(!HAVE.libnbd)("an export's clients changed while it serves", () => {
  let broker: Broker;
  const pskFile = join(dir, 'keys.psk');

  beforeAll(async () => {
    writeFileSync(pskFile, `alice:${randomBytes(32).toString('hex')}\nbob:${randomBytes(32).toString('hex')}\n`);
    mkdirSync(join(dir, 'pool'));
    broker = await createBroker({ state: join(dir, 'state'), nbd: { tls: { psk: pskFile } }, backends: [{ name: 'pool', kind: 'qcow2', path: join(dir, 'pool') }] },
      { plugins: builtinPlugins, logger: silentLogger });
    await broker.volumes.create('pool/disk', { sizeBytes: 2 * MiB });
  });

  afterAll(() => broker?.close());

  it("an export's clients changed while it serves (setClients): those shut out see no such export, a client connected before reads on, [] admits none; bound tenants and strangers are refused", async () => {
    const as = (who: string, uri: string) => `${uri.replace('nbds://', `nbds://${who}@`)}?tls-psk-file=${pskFile}`;
    const exp = await broker.exports.start('pool/disk', { name: 'moving', readOnly: true, listen: { port: 0 }, clients: ['alice'] });
    const port = Number(new URL(exp.uri).port);
    const aliceKey = readPskFile(pskFile).get('alice')!;
    try {
      const before = await startTls(port, { psk: { identity: 'alice', key: aliceKey } });
      expect(await go(before.wire, 'moving')).toContain(REP.ACK);
      const negotiating = await startTls(port, { psk: { identity: 'alice', key: aliceKey } }); // TLS up, no GO yet
      expect(await broker.exports.setClients('moving', ['bob'])).toMatchObject({ name: 'moving', clients: ['bob'] });
      expect(await go(negotiating.wire, 'moving')).toEqual([REP.ERR_UNKNOWN]);
      negotiating.wire.close();
      expect((await broker.exports.list()).find((e) => e.name === 'moving')).toMatchObject({ clients: ['bob'] });
      expect((await tool('nbdinfo', ['--size', as('alice', exp.uri)])).stderr).toMatch(/no export named ['"]moving['"]/);
      expect((await ok('nbdinfo', ['--size', as('bob', exp.uri)])).trim()).toBe(String(2 * MiB));
      const cookie = request(before.wire, CMD.READ, 0, 4096);
      expect(await reply(before.wire, 4096)).toMatchObject({ cookie, error: 0 });
      before.wire.close();

      expect((await broker.exports.setClients('moving', [])).clients).toEqual([]);
      for (const who of ['alice', 'bob']) expect((await tool('nbdinfo', ['--size', as(who, exp.uri)])).stderr).toMatch(/no export named ['"]moving['"]/);
      // Started admitting none (a service brings one back so): opened by setClients.
      const fenced = await broker.exports.start('pool/disk', { name: 'fenced', readOnly: true, listen: { port }, clients: [] });
      expect(fenced.clients).toEqual([]);
      expect((await tool('nbdinfo', ['--size', as('bob', exp.uri.replace('/moving', '/fenced'))])).stderr).toMatch(/no export named ['"]fenced['"]/);
      await broker.exports.setClients('fenced', ['bob']);
      expect((await ok('nbdinfo', ['--size', as('bob', exp.uri.replace('/moving', '/fenced'))])).trim()).toBe(String(2 * MiB));
      await fenced.stop();

      // A tenant bound to bob cannot open its export to alice; another tenant's export does not exist for it.
      const t = broker.as({ id: 'tina', role: 'tenant', nbdClients: ['bob'] });
      await t.volumes.create('pool/tina2', { sizeBytes: MiB });
      const hers = await t.exports.start('pool/tina2', { readOnly: true, listen: { port } });
      try {
        await expect(t.exports.setClients(hers.name, ['alice'])).rejects.toMatchObject({ code: 'PermissionDenied', message: expect.stringMatching(/only its NBD clients \(bob\), not alice/) });
        // Nor can an administrator: the export is bound as its owner was when it started.
        await expect(broker.exports.setClients(hers.name, ['alice'])).rejects.toMatchObject({ code: 'PermissionDenied' });
        await expect(t.exports.setClients('moving', ['bob'])).rejects.toMatchObject({ code: 'NotFound' });
        await expect(broker.as({ id: 'other', role: 'tenant' }).exports.setClients(hers.name, [])).rejects.toMatchObject({ code: 'NotFound' });
      } finally {
        await hers.stop();
        await t.volumes.delete('pool/tina2');
      }
      for (const bad of [[''], 'alice', undefined]) {
        await expect(broker.exports.setClients('moving', bad as never)).rejects.toMatchObject({ code: 'InvalidArgument' });
      }
      await expect(broker.exports.setClients('nothing', ['bob'])).rejects.toMatchObject({ code: 'NotFound' });
    } finally {
      await exp.stop();
    }
  });
});

describe.skipIf(!HAVE.libnbd)('reading the credentials again (NbdTls.reload, broker.exports.reloadTls; SIGHUP of offload serve)', () => {
  const dev = memoryDevice(MiB);
  const data = randomBytes(64 * 1024);
  const files = (from: string, to: string) => {
    mkdirSync(to, { recursive: true });
    for (const f of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']) writeFileSync(join(to, f), readFileSync(join(CREDS, from, f)));
  };
  const creds = (who: string) => ({ ca: readFileSync(join(CREDS, who, 'ca-cert.pem')), cert: readFileSync(join(CREDS, who, 'client-cert.pem')), key: readFileSync(join(CREDS, who, 'client-key.pem')) });
  const fingerprint = (folder: string) => new X509Certificate(readFileSync(join(CREDS, folder, 'server-cert.pem'))).fingerprint256;

  it("x509: a certificate is named by its subject alternative names too (DNS:…, URI:…), in nbd.tls.allow and an export's clients — one with no common name, as SPIFFE issues", async () => {
    const folder = join(dir, 'san-x509');
    files('server', folder);
    const tls = loadNbdTls({ x509: folder, allow: ['alice', 'DNS:kvm9.example'] });
    const server = await NbdServer.listen({ port: 0 }, { tls });
    try {
      server.addExport({ name: 'vm9', device: dev, readOnly: true, clients: ['URI:spiffe://offload.test/kvm9'] });
      server.addExport({ name: 'any', device: dev, readOnly: true });
      const size = (who: string, name: string) => tool('nbdinfo', ['--size', `nbds://localhost:${portOf(server)}/${name}?tls-certificates=${join(CREDS, who)}`]);
      expect((await size('san', 'vm9')).stdout.trim()).toBe(String(MiB));
      expect((await size('client', 'vm9')).stderr).toMatch(/no export named ['"]vm9['"]/);
      expect((await size('client', 'any')).status).toBe(0);
      expect((await size('revoked', 'any')).status).not.toBe(0); // eve: not in allow
    } finally {
      await server.close();
    }
  });

  it('x509: a ca-crl.pem put beside the CA revokes eve for new connections (hers made before reads on), a renewed certificate is served, a broken folder keeps what it had', async () => {
    await dev.write(0, data);
    const folder = join(dir, 'reload-x509');
    files('server', folder);
    const tls = loadNbdTls({ x509: folder });
    const server = await NbdServer.listen({ port: 0 }, { tls });
    try {
      server.addExport({ name: 'vol', device: dev, readOnly: true });
      const port = portOf(server);
      const size = (who: string) => tool('nbdinfo', ['--size', `nbds://127.0.0.1:${port}/vol?tls-certificates=${join(CREDS, who)}`]);
      expect((await size('revoked')).status).toBe(0);
      const eve = await startTls(port, creds('revoked'));
      expect(await go(eve.wire, 'vol')).toContain(REP.ACK);
      expect(eve.tls.getPeerX509Certificate()!.fingerprint256).toBe(fingerprint('server'));

      writeFileSync(join(folder, 'ca-crl.pem'), readFileSync(join(CREDS, 'server-crl', 'ca-crl.pem')));
      for (const f of ['server-cert.pem', 'server-key.pem']) writeFileSync(join(folder, f), readFileSync(join(CREDS, 'renewed', f)));
      tls.reload();
      expect((await size('revoked')).status).not.toBe(0);
      expect((await ok('nbdinfo', ['--size', `nbds://localhost:${port}/vol?tls-certificates=${join(CREDS, 'client')}`])).trim()).toBe(String(MiB));
      const alice = await startTls(port, creds('client'));
      expect(alice.tls.getPeerX509Certificate()!.fingerprint256).toBe(fingerprint('renewed'));
      alice.wire.close();
      // eve's connection from before: still served (as with QEMU, a revocation counts at the handshake).
      const cookie = request(eve.wire, CMD.READ, 0, data.length);
      const r = await reply(eve.wire, data.length);
      expect({ cookie: r.cookie, error: r.error, same: r.data?.equals(data) }).toEqual({ cookie, error: 0, same: true });
      eve.wire.close();

      // The revocation list taken away: refused (eve would be let in again), and she stays refused.
      rmSync(join(folder, 'ca-crl.pem'));
      expect(() => tls.reload()).toThrow(/ca-crl\.pem was in use and is gone; the certificates it revoked stay refused until a restart/);
      expect((await size('revoked')).status).not.toBe(0);
      // Nor an older list of the CA (issued before eve was revoked), nor another CA's list.
      writeFileSync(join(folder, 'ca-crl.pem'), readFileSync(join(CREDS, 'old-crl', 'ca-crl.pem')));
      expect(() => tls.reload()).toThrow(/ca-crl\.pem cannot replace the revocation list in use: it was issued 2020-01-01T00:00:00\.000Z, before the one in use \(20\d\d-/);
      writeFileSync(join(folder, 'ca-crl.pem'), readFileSync(join(CREDS, 'other-crl', 'ca-crl.pem')));
      expect(() => tls.reload()).toThrow(/ca-crl\.pem cannot replace the revocation list in use: it has no list of an issuer the one in use has/);
      expect((await size('revoked')).status).not.toBe(0);
      writeFileSync(join(folder, 'ca-crl.pem'), readFileSync(join(CREDS, 'server-crl', 'ca-crl.pem')));
      tls.reload(); // the same list again: taken
      // A CA rotated, with its own list: the old CA's list is no longer needed.
      for (const f of ['ca-cert.pem', 'ca-crl.pem']) writeFileSync(join(folder, f), readFileSync(join(CREDS, 'other-crl', f)));
      tls.reload();
      expect((await size('client')).status).not.toBe(0); // alice's certificate is of the CA no longer trusted
      for (const f of ['ca-cert.pem', 'ca-crl.pem']) writeFileSync(join(folder, f), readFileSync(join(CREDS, 'server-crl', f)));
      tls.reload();
      // One that cannot be read is a ConfigError at the start.
      const broken = join(dir, 'broken-crl');
      files('server', broken);
      writeFileSync(join(broken, 'ca-crl.pem'), '-----BEGIN X509 CRL-----\nMIIBAAAA\n-----END X509 CRL-----\n');
      expect(() => loadNbdTls({ x509: broken })).toThrow(/nbd\.tls\.x509: .*broken-crl\/ca-crl\.pem: revocation list 1 cannot be read: truncated/);

      // A key that is not the certificate's: refused, and the server serves on with what it had.
      writeFileSync(join(folder, 'server-key.pem'), readFileSync(join(CREDS, 'client', 'client-key.pem')));
      expect(() => tls.reload()).toThrow(/nbd\.tls\.x509: the credentials in .*reload-x509 cannot be used/);
      expect((await ok('nbdinfo', ['--size', `nbds://127.0.0.1:${port}/vol?tls-certificates=${join(CREDS, 'client')}`])).trim()).toBe(String(MiB));
      expect((await size('revoked')).status).not.toBe(0);
    } finally {
      await server.close();
    }
  });

  it("a broker reads the config's PSK file and each export's own folder: a key added opens, one taken away is refused; administrators only; a bad file keeps the old keys", async () => {
    const psk = join(dir, 'reload.psk');
    const alice = randomBytes(32).toString('hex');
    const carol = randomBytes(32).toString('hex');
    writeFileSync(psk, `alice:${alice}\n`);
    const aliceFile = join(dir, 'alice.psk');
    writeFileSync(aliceFile, `alice:${alice}\n`);
    const carolFile = join(dir, 'carol.psk');
    writeFileSync(carolFile, `carol:${carol}\n`);
    const folder = join(dir, 'reload-own');
    files('server', folder);
    mkdirSync(join(dir, 'reload-pool'));
    const broker = await createBroker({ state: join(dir, 'reload-state'), nbd: { tls: { psk } }, backends: [{ name: 'pool', kind: 'qcow2', path: join(dir, 'reload-pool') }] },
      { plugins: builtinPlugins, logger: silentLogger });
    try {
      await broker.volumes.create('pool/d', { sizeBytes: MiB });
      const viaPsk = await broker.exports.start('pool/d', { name: 'psk', readOnly: true, listen: { port: 0 } });
      const own = await broker.exports.start('pool/d', { name: 'own', readOnly: true, listen: { port: 0 }, tls: { x509: folder } });
      const size = (uri: string, who: string, file: string) => tool('nbdinfo', ['--size', `${uri.replace('nbds://', `nbds://${who}@`)}?tls-psk-file=${file}`]);
      expect((await size(viaPsk.uri, 'alice', aliceFile)).status).toBe(0);
      expect((await size(viaPsk.uri, 'carol', carolFile)).status).not.toBe(0);

      writeFileSync(psk, `carol:${carol}\n`);
      writeFileSync(join(folder, 'ca-crl.pem'), readFileSync(join(CREDS, 'server-crl', 'ca-crl.pem')));
      await expect(broker.as({ id: 'tina', role: 'tenant' }).exports.reloadTls()).rejects.toMatchObject({ code: 'PermissionDenied' });
      expect(await broker.exports.reloadTls()).toEqual({ reloaded: 2, failed: [] }); // the config's, and the export's own
      expect((await size(viaPsk.uri, 'carol', carolFile)).status).toBe(0);
      expect((await size(viaPsk.uri, 'alice', aliceFile)).status).not.toBe(0);
      expect((await tool('nbdinfo', ['--size', `${own.uri}?tls-certificates=${join(CREDS, 'revoked')}`])).status).not.toBe(0);
      expect((await tool('nbdinfo', ['--size', `${own.uri}?tls-certificates=${join(CREDS, 'client')}`])).status).toBe(0);

      // A bad file: that one keeps what it had, the others are read.
      writeFileSync(psk, 'carol:not-hex\n');
      expect(await broker.exports.reloadTls()).toEqual({ reloaded: 1, failed: [expect.stringMatching(/reload\.psk line 1 is not identity:hexkey/)] });
      expect((await size(viaPsk.uri, 'carol', carolFile)).status).toBe(0);
      await viaPsk.stop();
      await own.stop();
    } finally {
      await broker.close();
    }
  });
});
