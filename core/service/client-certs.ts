/**
 * Client certificates on the control API's HTTPS listener (`--tls-client-ca`): who a connection's
 * certificate names, judged once, at its handshake, under the CA of that moment.
 *
 * Node decides `socket.authorized` at the first handshake and never again, while a TLS 1.2
 * renegotiation can put another certificate — one no CA signed — behind `getPeerCertificate()`
 * of the same socket. So renegotiation is refused (SSL_OP_NO_RENEGOTIATION, in every secure
 * context the server is given), and the name a connection stands for is the one recorded at its
 * handshake, for as long as its certificate is the same, unexpired, and verified under the CA in
 * use now (a CA changed on SIGHUP does not keep letting in the connections it verified).
 */
import { constants } from 'node:crypto';
import type { Server as TlsServer, TLSSocket } from 'node:tls';
import { ConfigError } from '../config/config-error.js';
import { certificateNames } from '../export/cert-names.js';
import { caSubjects, olderCrl, readCrls } from '../export/crl.js';

/**
 * HTTPS: the service's certificate and key (PEM), the CA whose client certificates are asked for,
 * and that CA's revocation list (a revoked certificate stands for no one).
 */
export interface ServiceTls { cert: Buffer; key: Buffer; clientCa?: Buffer; clientCrl?: Buffer }

/** The options of the HTTPS server (and of each secure context it is given again). */
export function httpsOptions(tls: ServiceTls) {
  return {
    cert: tls.cert, key: tls.key, secureOptions: constants.SSL_OP_NO_RENEGOTIATION,
    // Asked for, not required: a client may come with a bearer token instead.
    ...(tls.clientCa ? { ca: tls.clientCa, requestCert: true, rejectUnauthorized: false } : {}),
    ...(tls.clientCrl ? { crl: tls.clientCrl } : {}),
  };
}

interface Verified { fingerprint: string; names: string[]; validTo: number; generation: number }

export class ClientCertificates {
  private readonly verified = new WeakMap<TLSSocket, Verified>();
  /** Bumped whenever the client CA or its revocation list changes: connections verified under the ones before no longer count. */
  private generation = 0;

  constructor(private readonly server: TlsServer, private clientCa: Buffer | undefined, private clientCrl: Buffer | undefined) {
    server.on('secureConnection', (s: TLSSocket) => {
      if (!s.authorized || s.authorizationError) return;
      const cert = s.getPeerCertificate();
      const names = certificateNames(cert);
      if (names.length === 0) return;
      this.verified.set(s, { fingerprint: cert.fingerprint256, names, validTo: Date.parse(cert.valid_to), generation: this.generation });
    });
  }

  /**
   * New credentials (SIGHUP), from the next handshake on. A client CA or revocation list changed:
   * the connections verified before stop counting (their clients are asked to connect again by a
   * 401); the same ones: they go on.
   */
  renew(tls: ServiceTls): void {
    // An older revocation list, or none of an issuer, would let in again what the one in use revoked.
    const older = this.clientCrl && olderCrl(readCrls(this.clientCrl, '--tls-client-crl'), tls.clientCrl ? readCrls(tls.clientCrl, '--tls-client-crl') : [], caSubjects(tls.clientCa ?? ''));
    if (older) throw new ConfigError(`--tls-client-crl cannot replace the revocation list in use: ${older}; the certificates it revoked stay refused until a restart`, 'put back the one in use, or a newer one of the CA');
    this.server.setSecureContext(httpsOptions(tls));
    const same = (a: Buffer | undefined, b: Buffer | undefined) => (a === undefined ? b === undefined : b !== undefined && a.equals(b));
    if (!(tls.clientCa && same(tls.clientCa, this.clientCa) && same(tls.clientCrl, this.clientCrl))) this.generation++;
    this.clientCa = tls.clientCa;
    this.clientCrl = tls.clientCrl;
  }

  /** The names a connection's client certificate stands for (certificateNames); none when it stands for none. */
  namesOf(socket: TLSSocket): string[] {
    const v = this.verified.get(socket);
    if (!v || v.generation !== this.generation || !(Date.now() < v.validTo)) return [];
    return socket.getPeerCertificate()?.fingerprint256 === v.fingerprint ? v.names : [];
  }
}
