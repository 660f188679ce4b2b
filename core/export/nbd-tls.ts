/**
 * TLS for NBD (`NBD_OPT_STARTTLS`), with the credentials qemu-nbd takes: an x509 folder as
 * `tls-creds-x509` reads it (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`), or a PSK file as
 * `tls-creds-psk` and nbdkit `--tls-psk` read it (`identity:hexkey` lines, what psktool writes).
 */
import { constants } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import type { Socket } from 'node:net';
import { join } from 'node:path';
import { createSecureContext, createServer, type TLSSocket, type TlsOptions } from 'node:tls';
import { ConfigError } from '../config/config-error.js';
import { certificateNames, clientName } from './cert-names.js';
import { caSubjects, olderCrl, readCrls, type CrlInfo } from './crl.js';

/** What a broker's config says (`nbd.tls`): paths already absolute. `verifyPeer` defaults to true, as QEMU's. */
export type NbdTlsConfig = { x509: string; verifyPeer?: boolean; allow?: string[] } | { psk: string };

/** Loaded credentials: what a server needs to turn a socket that asked for STARTTLS into TLS. */
export interface NbdTls {
  readonly kind: 'x509' | 'psk';
  /** Whether the upgrade names every client (PSK identities; x509 only when client certificates are asked for). */
  readonly namesClients: boolean;
  /**
   * Start TLS on a socket (the server side); resolves once it is up and the peer accepted, rejects
   * otherwise. `clients`: who the peer is — its certificate's names (certificateNames: its common
   * name, `DNS:…`, `URI:…`), or the identity it gave its key under (PSK); what an export's
   * `clients` and `allow` are matched against. `client`: the first of them, for messages.
   */
  upgrade(socket: Socket): Promise<{ socket: TLSSocket; client?: string; clients: string[] }>;
  /**
   * Read the files again (a renewed certificate, a new ca-crl.pem, PSK keys added or taken away):
   * handshakes from now on use them; clients connected already stay. A file that cannot be used
   * throws its ConfigError and the credentials in use stay as they were. `next`: the settings
   * changed too (another folder, an `allow` list; ConfiguredNbdTls.change keeps the kind).
   */
  reload(next?: NbdTlsConfig): void;
}

/**
 * PSK key exchanges are off in OpenSSL's default list: TLS 1.2's PSK suites, forward-secret ones
 * first (TLS 1.3 suites all take a PSK). GnuTLS clients (QEMU, libnbd) offer these.
 */
const PSK_CIPHERS = [
  'ECDHE-PSK-CHACHA20-POLY1305', 'ECDHE-PSK-AES256-CBC-SHA384', 'ECDHE-PSK-AES128-CBC-SHA256',
  'DHE-PSK-AES256-GCM-SHA384', 'DHE-PSK-AES128-GCM-SHA256', 'PSK-AES256-GCM-SHA384', 'PSK-AES128-GCM-SHA256',
].join(':');

/** Read the credentials a config names; a missing or bad file is a ConfigError naming it. */
export function loadNbdTls(c: NbdTlsConfig): NbdTls {
  let current = readCredentials(c);
  return {
    kind: current.kind,
    namesClients: current.namesClients,
    upgrade: (socket) => upgrade(current, socket),
    reload: (settings = c) => {
      const next = readCredentials(settings);
      // A revocation list that vanished, or an older one, would let in again what the one in use
      // revoked: a restart takes one away, a reload does not (a newer list replaces it).
      const older = current.crls && olderCrl(current.crls, next.crls ?? [], caSubjects(next.options.ca?.toString() ?? ''));
      if (older && 'x509' in settings) {
        const file = join(settings.x509, 'ca-crl.pem');
        throw new ConfigError(next.crls ? `nbd.tls.x509: ${file} cannot replace the revocation list in use: ${older}; the certificates it revoked stay refused until a restart` : `nbd.tls.x509: ${file} was in use and is gone; the certificates it revoked stay refused until a restart`,
          'put back the one in use, or a newer one of the CA');
      }
      current = next;
      c = settings;
    },
  };
}

/**
 * The config's `nbd.tls`: loaded when first needed (`get`), and its settings changed while the
 * broker runs (Broker.reconfigure) within what its servers were started with.
 */
export class ConfiguredNbdTls {
  private loaded?: NbdTls;

  constructor(private config: NbdTlsConfig) {}

  readonly get = (): NbdTls => (this.loaded ??= loadNbdTls(this.config));

  /** The credentials if loaded already (what a reload reads again). */
  get current(): NbdTls | undefined {
    return this.loaded;
  }

  /**
   * New settings: true once in use (files read now if loaded; a file that cannot be used throws
   * its ConfigError and nothing changes); false when they need a restart — another kind, or
   * verifyPeer changed (whether clients are named is fixed for the servers running).
   */
  change(next: NbdTlsConfig): boolean {
    const peer = (t: NbdTlsConfig) => ('psk' in t ? 'psk' : `x509:${t.verifyPeer !== false}`);
    if (peer(next) !== peer(this.config)) return false;
    this.loaded?.reload(next);
    this.config = next;
    return true;
  }
}

/** What one reading of the files gives: the options of a TLS server, and how it names and refuses clients. */
interface Credentials {
  kind: NbdTls['kind'];
  options: TlsOptions;
  namesClients: boolean;
  identify: (t: TLSSocket) => string[];
  refused?: (names: string[]) => string | undefined;
  /** The revocation lists in use (x509 with a ca-crl.pem). */
  crls?: CrlInfo[];
}

function readCredentials(c: NbdTlsConfig): Credentials {
  if ('psk' in c) {
    const keys = readPskFile(c.psk);
    const identities = new WeakMap<TLSSocket, string>();
    // An unknown identity gets null: OpenSSL ends the handshake with unknown_psk_identity.
    const options: TlsOptions = {
      ciphers: PSK_CIPHERS, dhparam: 'auto',
      pskCallback: (s, identity) => {
        identities.set(s, identity);
        return keys.get(identity) ?? null;
      },
    };
    return { kind: 'psk', options, namesClients: true, identify: (t) => { const id = identities.get(t); return id === undefined ? [] : [id]; } };
  }
  const read = (file: string): Buffer => readConfigFile(join(c.x509, file), 'nbd.tls.x509');
  // As QEMU's tls-creds-x509: clients must show a certificate of the CA unless verify-peer is
  // turned off, and a ca-crl.pem beside it revokes certificates.
  const verifyPeer = c.verifyPeer !== false;
  if (c.allow && !verifyPeer) throw new ConfigError('nbd.tls.allow: names clients by their certificates, which verifyPeer: false does not ask for');
  const crlFile = join(c.x509, 'ca-crl.pem');
  const crl = verifyPeer && existsSync(crlFile) ? read('ca-crl.pem') : undefined;
  const options: TlsOptions = {
    cert: read('server-cert.pem'), key: read('server-key.pem'),
    ...(verifyPeer ? { ca: read('ca-cert.pem'), requestCert: true, rejectUnauthorized: true } : {}),
    ...(crl ? { crl } : {}),
  };
  const crls = crl && readCrls(crl, `nbd.tls.x509: ${crlFile}`);
  try {
    createSecureContext(options);
  } catch (e) {
    throw new ConfigError(`nbd.tls.x509: the credentials in ${c.x509} cannot be used: ${(e as Error).message}`,
      'server-cert.pem and server-key.pem must be a certificate and its key, ca-cert.pem the CA and ca-crl.pem (if there) its revocation list, in PEM (as qemu-nbd --tls-creds reads them)');
  }
  // As QEMU's tls-authz on an NBD server: of the certificates the CA signed, only these subjects'.
  let allow: Set<string> | undefined;
  try {
    allow = c.allow && new Set(c.allow.map(clientName));
  } catch (e) {
    throw new ConfigError(`nbd.tls.allow: ${(e as Error).message}`);
  }
  const refused = allow && ((names: string[]) => (names.some((n) => allow.has(n)) ? undefined : `client certificate ${JSON.stringify(names.join(', '))} is not in nbd.tls.allow`));
  return { kind: 'x509', options, namesClients: verifyPeer, identify: (t) => certificateNames(t.getPeerCertificate()), ...(refused ? { refused } : {}), ...(crls ? { crls } : {}) };
}

/**
 * TLS on a socket through a `tls.Server` of its own that never listens: the socket is handed to
 * it as a connection (net.Server's documented injection), so node verifies a client's
 * certificate as for any TLS server (a TLSSocket made by hand is never told whether it was
 * verified), and drops one it refuses.
 */
function upgrade(c: Credentials, socket: Socket): Promise<{ socket: TLSSocket; client?: string; clients: string[] }> {
  return new Promise((resolve, reject) => {
    // Who the client is is judged at its handshake: a renegotiation (TLS 1.2) is refused.
    const server = createServer({ ...c.options, secureOptions: constants.SSL_OP_NO_RENEGOTIATION });
    const fail = (e: Error) => {
      socket.destroy();
      reject(e);
    };
    const left = () => fail(new Error('the TLS handshake failed, or the client left during it'));
    server.once('tlsClientError', fail);
    socket.once('close', left);
    server.once('secureConnection', (t: TLSSocket) => {
      socket.off('close', left);
      const clients = c.identify(t);
      const why = c.refused?.(clients);
      if (why) fail(new Error(why));
      else resolve({ socket: t, clients, ...(clients.length > 0 ? { client: clients[0] } : {}) });
    });
    server.emit('connection', socket);
  });
}

/**
 * `identity:hexkey` per line (blank lines and `#` comments skipped): the keys.psk qemu's
 * `tls-creds-psk` reads from its folder, nbdkit's `--tls-psk` and libnbd's `tls-psk-file`.
 */
export function readPskFile(path: string): Map<string, Buffer> {
  const text = readConfigFile(path, 'nbd.tls.psk').toString('utf8');
  const keys = new Map<string, Buffer>();
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const colon = line.lastIndexOf(':');
    const identity = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (colon <= 0 || !/^([0-9a-fA-F]{2})+$/.test(hex)) {
      throw new ConfigError(`nbd.tls.psk: ${path} line ${i + 1} is not identity:hexkey`, 'one client per line, as psktool writes: alice:<hex digits>');
    }
    keys.set(identity, Buffer.from(hex, 'hex'));
  });
  if (keys.size === 0) throw new ConfigError(`nbd.tls.psk: ${path} holds no key`, 'one client per line, as psktool writes: alice:<hex digits>');
  return keys;
}

function readConfigFile(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (e) {
    throw new ConfigError(`${what}: cannot read ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
}
