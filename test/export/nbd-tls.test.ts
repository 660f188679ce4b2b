/**
 * NBD over TLS (STARTTLS), as qemu-nbd `--tls-creds` serves it: with a PSK file and with x509
 * credentials (test/support/tls/, made by make-certs.sh), against QEMU and libnbd, which speak it
 * through GnuTLS; the handshake rules byte by byte with the test client; and the broker's config.
 */
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Duplex } from 'node:stream';
import { connect as tlsConnect } from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createBroker, silentLogger, type Broker } from '../../core/index.js';
import { NbdServer } from '../../core/export/nbd-server.js';
import { loadNbdTls, readPskFile } from '../../core/export/nbd-tls.js';
import { IHAVEOPT, OPT, REP } from '../../core/export/nbd-protocol.js';
import { builtinPlugins } from '../../plugins/index.js';
import { memoryDevice, type MemoryDevice } from '../support/memory-device.js';
import { go, greet, nameData, option, optionReplies, optionReply, startTls, Wire } from '../support/nbd-client.js';
import { HAVE, ok, tool } from '../support/nbd-tools.js';

const MiB = 1024 * 1024;
const CREDS = join(import.meta.dirname, '../support/tls');
const dir = mkdtempSync(join(tmpdir(), 'offload-nbd-tls-'));
const pskFile = join(dir, 'keys.psk');
const key = randomBytes(32).toString('hex');
writeFileSync(pskFile, `# clients\nalice:${key}\n\nbob:${randomBytes(32).toString('hex')}\n`);
// qemu's tls-creds-psk reads keys.psk in a folder; the same key, and a wrong one for alice.
const qemuPsk = join(dir, 'qemu-psk');
const wrongPsk = join(dir, 'wrong-psk');
mkdirSync(qemuPsk);
mkdirSync(wrongPsk);
writeFileSync(join(qemuPsk, 'keys.psk'), `alice:${key}\n`);
writeFileSync(join(wrongPsk, 'keys.psk'), `alice:${randomBytes(32).toString('hex')}\n`);

afterAll(() => rmSync(dir, { recursive: true, force: true }));

function portOf(s: NbdServer): number {
  return (s.address as { port: number }).port;
}

/** qemu-img's --image-opts for export `name` on 127.0.0.1:port with TLS object tls0. */
function qemuTarget(port: number, name: string): string {
  return `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},export=${name},tls-creds=tls0`;
}

/** Read a whole export with qemu-img convert through TLS (the object given), as a Buffer. */
async function qemuRead(object: string, port: number, name: string): Promise<Buffer> {
  const out = join(dir, `read-${randomBytes(4).toString('hex')}.raw`);
  await ok('qemu-img', ['convert', '--object', object, '--image-opts', qemuTarget(port, name), '-O', 'raw', out]);
  return readFileSync(out);
}

describe.skipIf(!HAVE.qemu || !HAVE.libnbd)('NBD over TLS with a PSK file (qemu tls-creds-psk, libnbd tls-psk-file)', () => {
  let server: NbdServer;
  let dev: MemoryDevice;
  let port: number;
  const data = randomBytes(4 * MiB);

  beforeAll(async () => {
    server = await NbdServer.listen({ port: 0 }, { tls: loadNbdTls({ psk: pskFile }) });
    port = portOf(server);
    dev = memoryDevice(8 * MiB);
    server.addExport({ name: 'vol', device: dev, readOnly: false });
  });

  afterAll(() => server.close());

  it('its URI is nbds://; nbdcopy writes through TLS and qemu-img reads the same bytes back', async () => {
    expect(server.uri('vol')).toBe(`nbds://127.0.0.1:${port}/vol`);
    const src = join(dir, 'src.raw');
    writeFileSync(src, Buffer.concat([data, Buffer.alloc(4 * MiB)]));
    await ok('nbdcopy', [src, `nbds://alice@127.0.0.1:${port}/vol?tls-psk-file=${pskFile}`]);
    expect(Buffer.from(await dev.read(0, 4 * MiB)).equals(data)).toBe(true);
    const back = await qemuRead(`tls-creds-psk,id=tls0,endpoint=client,dir=${qemuPsk},username=alice`, port, 'vol');
    expect(back.subarray(0, 4 * MiB).equals(data)).toBe(true);
    expect(back.subarray(4 * MiB).equals(Buffer.alloc(4 * MiB))).toBe(true);
  });

  it('a wrong key, an unknown identity and a client without TLS are refused, and the device is untouched', async () => {
    const wrong = await tool('qemu-img', ['info', '--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${wrongPsk},username=alice`, '--image-opts', qemuTarget(port, 'vol')]);
    expect(wrong.status).not.toBe(0);
    const stranger = join(dir, 'stranger.psk');
    writeFileSync(stranger, `carol:${key}\n`);
    const unknown = await tool('nbdinfo', ['--size', `nbds://carol@127.0.0.1:${port}/vol?tls-psk-file=${stranger}`]);
    expect(unknown.status).not.toBe(0);
    // qemu-img tells its user what the server said.
    const plain = await tool('qemu-img', ['info', `nbd://127.0.0.1:${port}/vol`]);
    expect(plain.status).not.toBe(0);
    expect(plain.stderr).toMatch(/TLS negotiation required/);
    expect(plain.stderr).toMatch(/this server requires TLS/);
    const plainWrite = await tool('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 64k', `nbd://127.0.0.1:${port}/vol`]);
    expect(plainWrite.status).not.toBe(0);
    expect(Buffer.from(await dev.read(0, 4 * MiB)).equals(data)).toBe(true);
    // And the server goes on serving a client with the key.
    expect((await ok('nbdinfo', ['--size', `nbds://alice@127.0.0.1:${port}/vol?tls-psk-file=${pskFile}`])).trim()).toBe(String(8 * MiB));
  });

  it("node's own TLS client with the PSK: GO and READ over TLS", async () => {
    const { wire, tls } = await startTls(port, { psk: { identity: 'alice', key: Buffer.from(key, 'hex') } });
    expect(tls.getCipher().name).toMatch(/PSK/);
    expect(await go(wire, 'vol')).toContain(REP.ACK);
    wire.close();
  });
});

describe.skipIf(!HAVE.qemu || !HAVE.libnbd)('NBD over TLS with x509 credentials (qemu tls-creds-x509, libnbd tls-certificates)', () => {
  let server: NbdServer;
  let open: NbdServer;
  let withCrl: NbdServer;
  const dev = memoryDevice(4 * MiB);
  const data = randomBytes(MiB);
  const client = (f: string) => readFileSync(join(CREDS, 'client', f));
  const stranger = (f: string) => readFileSync(join(CREDS, 'stranger', f));

  beforeAll(async () => {
    await dev.write(0, data);
    server = await NbdServer.listen({ port: 0 }, { tls: loadNbdTls({ x509: join(CREDS, 'server') }) }); // verify-peer: the default, as QEMU's
    server.addExport({ name: 'vol', device: dev, readOnly: true });
    open = await NbdServer.listen({ port: 0 }, { tls: loadNbdTls({ x509: join(CREDS, 'server'), verifyPeer: false }) });
    open.addExport({ name: 'vol', device: dev, readOnly: true });
    withCrl = await NbdServer.listen({ port: 0 }, { tls: loadNbdTls({ x509: join(CREDS, 'server-crl') }) });
    withCrl.addExport({ name: 'vol', device: dev, readOnly: true });
  });

  afterAll(async () => {
    await server.close();
    await open.close();
    await withCrl.close();
  });

  it('verify-peer (the default): a client with a certificate of the CA is served (qemu-img, nbdinfo, by address and by name)', async () => {
    const back = await qemuRead(`tls-creds-x509,id=tls0,endpoint=client,dir=${join(CREDS, 'client')}`, portOf(server), 'vol');
    expect(back.subarray(0, MiB).equals(data)).toBe(true);
    for (const host of ['127.0.0.1', 'localhost']) {
      const size = await ok('nbdinfo', ['--size', `nbds://${host}:${portOf(server)}/vol?tls-certificates=${join(CREDS, 'client')}`]);
      expect(size.trim()).toBe(String(4 * MiB));
    }
  });

  it('verify-peer: no certificate, or one another CA signed, is refused — by the server, not only by the client', async () => {
    const caOnly = join(dir, 'ca-only');
    mkdirSync(caOnly, { recursive: true });
    writeFileSync(join(caOnly, 'ca-cert.pem'), client('ca-cert.pem'));
    expect((await tool('nbdinfo', ['--size', `nbds://127.0.0.1:${portOf(server)}/vol?tls-certificates=${caOnly}`])).status).not.toBe(0);
    expect((await tool('nbdinfo', ['--size', `nbds://127.0.0.1:${portOf(server)}/vol?tls-certificates=${join(CREDS, 'stranger')}`])).status).not.toBe(0);
    // GnuTLS keeps a certificate of another CA to itself; node's client sends it anyway: TLS 1.3
    // lets it finish its side, then the server, which checked the certificate, hangs up.
    const { wire } = await startTls(portOf(server), { ca: stranger('ca-cert.pem'), cert: stranger('client-cert.pem'), key: stranger('client-key.pem') });
    expect(await wire.waitClosed()).toBe(true);
    const good = await startTls(portOf(server), { ca: client('ca-cert.pem'), cert: client('client-cert.pem'), key: client('client-key.pem') });
    expect(await go(good.wire, 'vol')).toContain(REP.ACK);
    good.wire.close();
  });

  it('ca-crl.pem beside the CA revokes a certificate: its holder is refused by the server, others are served', async () => {
    const revoked = (f: string) => readFileSync(join(CREDS, 'revoked', f));
    expect((await tool('nbdinfo', ['--size', `nbds://127.0.0.1:${portOf(withCrl)}/vol?tls-certificates=${join(CREDS, 'revoked')}`])).status).not.toBe(0);
    const { wire } = await startTls(portOf(withCrl), { ca: revoked('ca-cert.pem'), cert: revoked('client-cert.pem'), key: revoked('client-key.pem') });
    expect(await wire.waitClosed()).toBe(true);
    // The same certificate where no CRL is given; and a certificate the CRL does not name.
    const elsewhere = await ok('nbdinfo', ['--size', `nbds://127.0.0.1:${portOf(server)}/vol?tls-certificates=${join(CREDS, 'revoked')}`]);
    expect(elsewhere.trim()).toBe(String(4 * MiB));
    const alice = await ok('nbdinfo', ['--size', `nbds://127.0.0.1:${portOf(withCrl)}/vol?tls-certificates=${join(CREDS, 'client')}`]);
    expect(alice.trim()).toBe(String(4 * MiB));
  });

  it('allow names the certificates let in by their common name, as QEMU\'s tls-authz: alice is served, eve (also of the CA) refused', async () => {
    const only = await NbdServer.listen({ port: 0 }, { tls: loadNbdTls({ x509: join(CREDS, 'server'), allow: ['alice', 'carol'] }) });
    try {
      only.addExport({ name: 'vol', device: dev, readOnly: true });
      const alice = await ok('nbdinfo', ['--size', `nbds://127.0.0.1:${portOf(only)}/vol?tls-certificates=${join(CREDS, 'client')}`]);
      expect(alice.trim()).toBe(String(4 * MiB));
      expect((await tool('nbdinfo', ['--size', `nbds://127.0.0.1:${portOf(only)}/vol?tls-certificates=${join(CREDS, 'revoked')}`])).status).not.toBe(0);
      const revoked = (f: string) => readFileSync(join(CREDS, 'revoked', f));
      const { wire } = await startTls(portOf(only), { ca: revoked('ca-cert.pem'), cert: revoked('client-cert.pem'), key: revoked('client-key.pem') });
      expect(await wire.waitClosed()).toBe(true);
    } finally {
      await only.close();
    }
    expect(() => loadNbdTls({ x509: join(CREDS, 'server'), verifyPeer: false, allow: ['alice'] })).toThrow(/nbd\.tls\.allow: .*verifyPeer: false/);
  });

  it('verifyPeer: false asks for no certificate, so it names no client: an export with clients is refused there', () => {
    expect(() => open.addExport({ name: 'bound', device: dev, readOnly: true, clients: ['alice'] })).toThrow(/named by their certificates, which this server's TLS \(verifyPeer: false\) does not ask for/);
  });

  it('verifyPeer: false: a client needs only the CA', async () => {
    const caOnly = join(dir, 'ca-only-2');
    mkdirSync(caOnly, { recursive: true });
    writeFileSync(join(caOnly, 'ca-cert.pem'), client('ca-cert.pem'));
    const size = await ok('nbdinfo', ['--size', `nbds://localhost:${portOf(open)}/vol?tls-certificates=${caOnly}`]);
    expect(size.trim()).toBe(String(4 * MiB));
  });
});

describe('the STARTTLS handshake, byte by byte', () => {
  let tlsServer: NbdServer;
  let plain: NbdServer;
  const ca = readFileSync(join(CREDS, 'client', 'ca-cert.pem'));

  beforeAll(async () => {
    tlsServer = await NbdServer.listen({ port: 0 }, { tls: loadNbdTls({ x509: join(CREDS, 'server'), verifyPeer: false }), handshakeLimitMs: 4000 });
    tlsServer.addExport({ name: 'vol', device: memoryDevice(MiB), readOnly: false });
    plain = await NbdServer.listen({ port: 0 });
    plain.addExport({ name: 'vol', device: memoryDevice(MiB), readOnly: false });
  });

  afterAll(async () => {
    await tlsServer.close();
    await plain.close();
  });

  it('before STARTTLS every option but ABORT gets ERR_TLS_REQD, and negotiation goes on', async () => {
    const w = await Wire.open(portOf(tlsServer));
    await greet(w);
    for (const [opt, data] of [[OPT.LIST, Buffer.alloc(0)], [OPT.STRUCTURED_REPLY, Buffer.alloc(0)], [OPT.GO, Buffer.concat([nameData('vol'), Buffer.from([0, 0])])],
      [OPT.INFO, Buffer.concat([nameData('vol'), Buffer.from([0, 0])])]] as const) {
      option(w, opt, data);
      const r = await optionReply(w);
      expect([r.option, r.type]).toEqual([opt, REP.ERR_TLS_REQD]);
      expect(r.data.toString()).toMatch(/requires TLS/);
    }
    option(w, OPT.ABORT);
    expect((await optionReply(w)).type).toBe(REP.ACK);
    expect(await w.waitClosed()).toBe(true);
  });

  it('EXPORT_NAME before STARTTLS (it has no error reply) ends the connection', async () => {
    const w = await Wire.open(portOf(tlsServer));
    await greet(w);
    option(w, OPT.EXPORT_NAME, Buffer.from('vol'));
    expect(await w.waitClosed()).toBe(true);
  });

  it('STARTTLS with data is INVALID; after TLS is up a second STARTTLS is INVALID and GO works', async () => {
    const w = await Wire.open(portOf(tlsServer));
    await greet(w);
    option(w, OPT.STARTTLS, Buffer.from('x'));
    expect((await optionReply(w)).type).toBe(REP.ERR_INVALID);
    w.close();
    const { wire } = await startTls(portOf(tlsServer), { ca });
    option(wire, OPT.STARTTLS);
    expect((await optionReply(wire)).type).toBe(REP.ERR_INVALID);
    expect(await go(wire, 'vol')).toContain(REP.ACK);
    wire.close();
  });

  it('bytes sent after STARTTLS before its reply (here a real ClientHello) end the connection at once', async () => {
    // Read by the server in the clear, they would be lost to TLS, which would then wait for a
    // ClientHello until the handshake limit (4 s): the connection must close well before.
    const hello = await new Promise<Buffer>((done) => {
      const sink = new Duplex({ read() {}, write(chunk: Buffer, _e, cb) { done(Buffer.from(chunk)); cb(); } });
      tlsConnect({ socket: sink as never, servername: 'localhost' }).on('error', () => undefined);
    });
    const w = await Wire.open(portOf(tlsServer));
    await greet(w);
    const head = Buffer.alloc(16);
    head.writeBigUInt64BE(IHAVEOPT, 0);
    head.writeUInt32BE(OPT.STARTTLS, 8);
    w.write(Buffer.concat([head, hello]));
    await optionReply(w).catch(() => undefined);
    expect(await w.waitClosed(2000)).toBe(true);
  });

  it('a client that stalls in the TLS handshake is dropped at the handshake limit', async () => {
    const w = await Wire.open(portOf(tlsServer));
    await greet(w);
    option(w, OPT.STARTTLS);
    expect((await optionReply(w)).type).toBe(REP.ACK);
    expect(await w.waitClosed(8000)).toBe(true);
  });

  it('closing the server cuts clients still negotiating, in the clear or in the TLS handshake (it does not wait out the limit)', async () => {
    const s = await NbdServer.listen({ port: 0 }, { tls: loadNbdTls({ x509: join(CREDS, 'server'), verifyPeer: false }), handshakeLimitMs: 10 * 60_000 });
    s.addExport({ name: 'vol', device: memoryDevice(MiB), readOnly: false });
    const clear = await Wire.open(portOf(s));
    await greet(clear);
    const inTls = await Wire.open(portOf(s));
    await greet(inTls);
    option(inTls, OPT.STARTTLS);
    expect((await optionReply(inTls)).type).toBe(REP.ACK);
    await s.close(); // before: until the handshake limit (here ten minutes)
    expect(await clear.waitClosed()).toBe(true);
    expect(await inTls.waitClosed()).toBe(true);
  });

  it('a server without TLS cannot tell clients apart: an export with clients is refused there', async () => {
    const plain = await NbdServer.listen({ port: 0 });
    try {
      expect(() => plain.addExport({ name: 'vol', device: memoryDevice(MiB), readOnly: true, clients: ['alice'] })).toThrow(/clients are told apart by TLS, which this server does not require/);
      expect(plain.exportNames()).toEqual([]);
    } finally {
      await plain.close();
    }
  });

  it('a server without TLS answers STARTTLS with ERR_POLICY and goes on', async () => {
    const w = await Wire.open(portOf(plain));
    await greet(w);
    option(w, OPT.STARTTLS);
    const r = await optionReply(w);
    expect(r.type).toBe(REP.ERR_POLICY);
    expect(r.data.toString()).toMatch(/not configured/);
    expect(await go(w, 'vol')).toContain(REP.ACK);
    w.close();
  });
});

describe('TLS credentials in the config (nbd.tls)', () => {
  it('missing files, a key that is not the certificate\'s and bad PSK lines are ConfigErrors naming the file', () => {
    expect(() => loadNbdTls({ x509: join(dir, 'nowhere') })).toThrow(/nbd\.tls\.x509: cannot read .*nowhere\/server-cert\.pem: ENOENT/);
    const mixed = join(dir, 'mixed');
    mkdirSync(mixed);
    writeFileSync(join(mixed, 'server-cert.pem'), readFileSync(join(CREDS, 'server', 'server-cert.pem')));
    writeFileSync(join(mixed, 'server-key.pem'), readFileSync(join(CREDS, 'client', 'client-key.pem')));
    expect(() => loadNbdTls({ x509: mixed, verifyPeer: false })).toThrow(/cannot be used/);
    expect(() => loadNbdTls({ x509: join(CREDS, 'server') })).not.toThrow();
    expect(() => loadNbdTls({ x509: mixed })).toThrow(/ca-cert\.pem: ENOENT/); // verify-peer, the default, needs the CA
    const bad = join(dir, 'bad.psk');
    writeFileSync(bad, 'alice:0011\nbob:xyz\n');
    expect(() => loadNbdTls({ psk: bad })).toThrow(/line 2 is not identity:hexkey/);
    writeFileSync(bad, '# nothing\n');
    expect(() => loadNbdTls({ psk: bad })).toThrow(/holds no key/);
  });

  describe.skipIf(!HAVE.libnbd)('a broker with nbd.tls', () => {
    let broker: Broker;
    const stateDir = join(dir, 'state');

    beforeAll(async () => {
      mkdirSync(join(dir, 'pool'));
      broker = await createBroker({ state: stateDir, nbd: { tls: { psk: pskFile } }, backends: [{ name: 'pool', kind: 'qcow2', path: join(dir, 'pool') }] },
        { plugins: builtinPlugins, logger: silentLogger });
      await broker.volumes.create('pool/disk', { sizeBytes: 2 * MiB });
    });

    afterAll(() => broker?.close());

    it('an export\'s own credentials (ExportOptions.tls) replace the config\'s; exports sharing an address must agree; bad ones are refused', async () => {
      const own = await broker.exports.start('pool/disk', { name: 'own', readOnly: true, listen: { port: 0 }, tls: { x509: join(CREDS, 'server') } });
      try {
        expect(own.uri).toMatch(/^nbds:\/\//);
        const port = Number(new URL(own.uri).port);
        // The config's PSK is not what this server asks for; the x509 client certificate is.
        expect((await tool('nbdinfo', ['--size', `nbds://alice@127.0.0.1:${port}/own?tls-psk-file=${pskFile}`])).status).not.toBe(0);
        await expect(broker.exports.start('pool/disk', { name: 'beside', readOnly: true, listen: { port } })).rejects.toMatchObject({ code: 'InvalidArgument', message: expect.stringMatching(/other TLS credentials/) });
      } finally {
        await own.stop();
      }
      await expect(broker.exports.start('pool/disk', { name: 'bad', readOnly: true, listen: { port: 0 }, tls: { x509: join(dir, 'nowhere') } })).rejects.toMatchObject({ code: 'InvalidArgument', message: expect.stringMatching(/nowhere/) });
      await expect(broker.exports.start('pool/disk', { name: 'bad', readOnly: true, listen: { port: 0 }, tls: { psk: pskFile, x509: CREDS } as never })).rejects.toMatchObject({ code: 'InvalidArgument', message: expect.stringMatching(/tls is/) });
      expect((await broker.exports.list()).map((e) => e.name)).toEqual([]);
    });

    it('an export\'s clients: only those open it (a PSK identity, a certificate\'s common name); to the others it does not exist, not even in LIST; a principal bound to its clients cannot widen them', async () => {
      const asBob = (uri: string) => `${uri.replace('nbds://', 'nbds://bob@')}?tls-psk-file=${pskFile}`;
      const asAlice = (uri: string) => `${uri.replace('nbds://', 'nbds://alice@')}?tls-psk-file=${pskFile}`;
      const mine = await broker.exports.start('pool/disk', { name: 'mine', readOnly: true, listen: { port: 0 }, clients: ['alice'] });
      const port = Number(new URL(mine.uri).port);
      const open = await broker.exports.start('pool/disk', { name: 'open', readOnly: true, listen: { port } });
      try {
        expect(mine.clients).toEqual(['alice']);
        expect((await broker.exports.list()).find((e) => e.name === 'mine')).toMatchObject({ clients: ['alice'] });
        expect((await ok('nbdinfo', ['--size', asAlice(mine.uri)])).trim()).toBe(String(2 * MiB));
        const bob = await tool('nbdinfo', ['--size', asBob(mine.uri)]);
        expect(bob.status).not.toBe(0);
        expect(bob.stderr).toMatch(/no export named ['"]mine['"]/);
        // LIST: bob sees only what he may open, alice both.
        const listed = async (who: string) => (await ok('nbdinfo', ['--list', '--json', `nbds://${who}@127.0.0.1:${port}?tls-psk-file=${pskFile}`]).then((t) => JSON.parse(t) as { exports: { 'export-name': string }[] })).exports.map((e) => e['export-name']).sort();
        expect(await listed('bob')).toEqual(['open']);
        expect(await listed('alice')).toEqual(['mine', 'open']);
        expect((await ok('nbdinfo', ['--size', asBob(open.uri)])).trim()).toBe(String(2 * MiB));
        // The default export (no name) is the only one the client may open: bob's is `open`; alice has two.
        const byDefault = (who: string) => tool('nbdinfo', ['--json', `nbds://${who}@127.0.0.1:${port}?tls-psk-file=${pskFile}`]);
        expect(JSON.parse((await byDefault('bob')).stdout) as unknown).toMatchObject({ exports: [{ 'export-name': 'open' }] }); // the server names it (NBD_INFO_NAME)
        expect((await byDefault('alice')).status).not.toBe(0);
        // Byte by byte, as bob: GO and INFO say unknown, EXPORT_NAME (no error reply) ends the connection.
        const bobKey = readPskFile(pskFile).get('bob')!;
        for (const opt of [OPT.GO, OPT.INFO]) {
          const { wire } = await startTls(port, { psk: { identity: 'bob', key: bobKey } });
          option(wire, opt, Buffer.concat([nameData('mine'), Buffer.from([0, 0])]));
          expect((await optionReplies(wire)).map((r) => r.type)).toEqual([REP.ERR_UNKNOWN]);
          wire.close();
        }
        const { wire } = await startTls(port, { psk: { identity: 'bob', key: bobKey } });
        option(wire, OPT.EXPORT_NAME, Buffer.from('mine'));
        expect(await wire.waitClosed()).toBe(true);
      } finally {
        await mine.stop();
        await open.stop();
      }
      // x509: the certificate's common name (alice's folder is CN alice, revoked's is another of the CA).
      const cert = await broker.exports.start('pool/disk', { name: 'cert', readOnly: true, listen: { port: 0 }, tls: { x509: join(CREDS, 'server') }, clients: ['alice'] });
      try {
        expect((await ok('nbdinfo', ['--size', `${cert.uri}?tls-certificates=${join(CREDS, 'client')}`])).trim()).toBe(String(2 * MiB));
        const other = await tool('nbdinfo', ['--size', `${cert.uri}?tls-certificates=${join(CREDS, 'revoked')}`]);
        expect(other.stderr).toMatch(/no export named ['"]cert['"]/);
      } finally {
        await cert.stop();
      }
      // A tenant bound to bob: its exports admit bob only, and it cannot name others.
      const t = broker.as({ id: 'tina', role: 'tenant', nbdClients: ['bob'] });
      await t.volumes.create('pool/tina', { sizeBytes: MiB });
      await expect(t.exports.start('pool/tina', { readOnly: true, listen: { port: 0 }, clients: ['bob', 'alice'] })).rejects.toMatchObject({ code: 'PermissionDenied', message: expect.stringMatching(/only its NBD clients \(bob\), not alice/) });
      const bound = await t.exports.start('pool/tina', { readOnly: true, listen: { port: 0 } });
      try {
        expect(bound.clients).toEqual(['bob']);
        expect((await ok('nbdinfo', ['--size', asBob(bound.uri)])).trim()).toBe(String(MiB));
        expect((await tool('nbdinfo', ['--size', asAlice(bound.uri)])).stderr).toMatch(/no export named ['"]pool\/tina['"]/);
      } finally {
        await bound.stop();
        await t.volumes.delete('pool/tina');
      }
      for (const bad of [[''], ['x', 3], 'alice']) {
        await expect(broker.exports.start('pool/disk', { readOnly: true, listen: { port: 0 }, clients: bad as never })).rejects.toMatchObject({ code: 'InvalidArgument', message: expect.stringMatching(/^clients is a list/) });
      }
      // [] admits none (until setClients): started, and stopped here.
      const none = await broker.exports.start('pool/disk', { name: 'none', readOnly: true, listen: { port: 0 }, clients: [] });
      expect(none.clients).toEqual([]);
      await none.stop();
    });

    it('serves every export with TLS: nbds:// on TCP, nbds+unix:// on a socket, and nbdinfo reads both with the key', async () => {
      const tcp = await broker.exports.start('pool/disk', { readOnly: true, listen: { port: 0 } });
      const unix = await broker.exports.start('pool/disk', { name: 'disk-unix', readOnly: true, listen: { socket: join(dir, 'nbd.sock') } });
      try {
        expect(tcp.uri).toMatch(/^nbds:\/\/127\.0\.0\.1:\d+\/pool\/disk$/);
        expect(unix.uri).toBe(`nbds+unix:///disk-unix?socket=${join(dir, 'nbd.sock')}`);
        expect((await ok('nbdinfo', ['--size', `${tcp.uri.replace('nbds://', 'nbds://alice@')}?tls-psk-file=${pskFile}`])).trim()).toBe(String(2 * MiB));
        expect((await ok('nbdinfo', ['--size', `nbds+unix://alice@/disk-unix?socket=${join(dir, 'nbd.sock')}&tls-psk-file=${pskFile}`])).trim()).toBe(String(2 * MiB));
        expect((await tool('nbdinfo', ['--size', tcp.uri.replace('nbds', 'nbd')])).status).not.toBe(0);
      } finally {
        await tcp.stop();
        await unix.stop();
      }
    });

    it('a broker whose credentials cannot be read does not start', async () => {
      await expect(createBroker({ state: join(dir, 'state2'), nbd: { tls: { x509: 'no-such-folder' } }, backends: [] }, { plugins: builtinPlugins, logger: silentLogger }))
        .rejects.toMatchObject({ name: 'ConfigError', message: expect.stringMatching(/nbd\.tls\.x509: cannot read .*no-such-folder\/server-cert\.pem/) });
      // A CLI command (no jobs recovered) reads them at its first export only.
      const command = await createBroker({ state: join(dir, 'state3'), nbd: { tls: { x509: 'no-such-folder' } }, backends: [{ name: 'pool', kind: 'qcow2', path: join(dir, 'pool') }] },
        { plugins: builtinPlugins, logger: silentLogger, recoverJobs: false });
      try {
        expect((await command.volumes.list('pool')).items.map((v) => v.name)).toEqual(['disk']);
        await expect(command.exports.start('pool/disk', { readOnly: true, listen: { port: 0 } }))
          .rejects.toMatchObject({ name: 'ConfigError', message: expect.stringMatching(/nbd\.tls\.x509: cannot read .*no-such-folder\/server-cert\.pem/) });
      } finally {
        await command.close();
      }
      await expect(createBroker({ state: join(dir, 'state2'), nbd: { tls: { psk: pskFile, x509: CREDS } } as never, backends: [] }, { plugins: builtinPlugins, logger: silentLogger }))
        .rejects.toMatchObject({ name: 'ConfigError', message: expect.stringMatching(/^nbd\.tls: expected \{ x509/) });
    });
  });
});
