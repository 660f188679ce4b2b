/**
 * What a certificate revocation list (RFC 5280 §5.1) says about itself: its issuer and when it was
 * issued — enough to refuse, when credentials are read again, a list older than the one in use
 * (a backup copied back over it would let in again what the newer one revoked). Node reads CRLs
 * only into a secure context, so this walks their DER.
 */
import { ConfigError } from '../config/config-error.js';

export interface CrlInfo {
  /** The issuer's distinguished name as DER, hex: lists of one CA compare equal. */
  issuer: string;
  /** thisUpdate: when the list was issued. */
  issued: Date;
}

/** Every `X509 CRL` block of a PEM file (`what` names the file in errors). */
export function readCrls(pem: string | Buffer, what: string): CrlInfo[] {
  const text = pem.toString();
  const blocks = [...text.matchAll(/-----BEGIN X509 CRL-----([\s\S]*?)-----END X509 CRL-----/g)];
  if (blocks.length === 0) throw new ConfigError(`${what} holds no revocation list (PEM: -----BEGIN X509 CRL-----)`);
  return blocks.map((m, i) => {
    try {
      return crlInfo(Buffer.from(m[1]!.replace(/\s+/g, ''), 'base64'));
    } catch (e) {
      throw new ConfigError(`${what}: revocation list ${i + 1} cannot be read: ${(e as Error).message}`);
    }
  });
}

/**
 * Why `next` may not take `current`'s place (undefined: it may): for each issuer the lists in use
 * have that is still a trusted CA (`trusted`: the new CA file's subjects, caSubjects; undefined: all), the new
 * ones must have one issued no earlier — a list gone, or an older one, would let in again what the
 * one in use revoked. A CA no longer trusted needs no list (a CA rotated). A restart takes one away.
 */
export function olderCrl(current: readonly CrlInfo[], next: readonly CrlInfo[], trusted: ReadonlySet<string> | undefined): string | undefined {
  for (const c of current) {
    if (trusted && !trusted.has(c.issuer)) continue;
    const n = next.filter((x) => x.issuer === c.issuer);
    if (n.length === 0) return `it has no list of an issuer the one in use has (issued ${c.issued.toISOString()})`;
    const newest = Math.max(...n.map((x) => x.issued.getTime()));
    if (newest < c.issued.getTime()) return `it was issued ${new Date(newest).toISOString()}, before the one in use (${c.issued.toISOString()})`;
  }
  return undefined;
}

/**
 * The subjects (DER, hex: as CrlInfo.issuer) of the certificates of a PEM file (a CA file);
 * undefined when one cannot be read (then every issuer counts as trusted: olderCrl checks all).
 */
export function caSubjects(pem: string | Buffer): Set<string> | undefined {
  const out = new Set<string>();
  for (const m of pem.toString().matchAll(/-----BEGIN (?:TRUSTED |X509 )?CERTIFICATE-----([\s\S]*?)-----END (?:TRUSTED |X509 )?CERTIFICATE-----/g)) {
    try {
      const der = Buffer.from(m[1]!.replace(/\s+/g, ''), 'base64');
      const cert = element(der, 0);
      const tbs = element(der, cert.start, cert.end);
      let e = element(der, tbs.start, tbs.end);
      if (e.tag === EXPLICIT_0) e = element(der, e.end, tbs.end); // version
      // serialNumber, signature, issuer, validity, then the subject.
      for (let i = 0; i < 4; i++) e = element(der, e.end, tbs.end);
      if (e.tag !== SEQUENCE) return undefined;
      out.add(der.subarray(e.at, e.end).toString('hex'));
    } catch {
      return undefined;
    }
  }
  return out;
}

/** One DER element: where it begins, its tag, and where its contents are. */
interface Element { at: number; tag: number; start: number; end: number }

function element(der: Buffer, at: number, limit = der.length): Element {
  if (at + 2 > limit) throw new Error('truncated');
  const tag = der[at]!;
  let len = der[at + 1]!;
  let start = at + 2;
  if (len & 0x80) {
    const n = len & 0x7f;
    if (n === 0 || n > 4 || start + n > limit) throw new Error('bad length');
    len = 0;
    for (let i = 0; i < n; i++) len = len * 256 + der[start + i]!;
    start += n;
  }
  if (start + len > limit) throw new Error('truncated');
  return { at, tag, start, end: start + len };
}

const SEQUENCE = 0x30;
const EXPLICIT_0 = 0xa0;
const INTEGER = 0x02;
const UTC_TIME = 0x17;
const GENERALIZED_TIME = 0x18;

function crlInfo(der: Buffer): CrlInfo {
  const list = element(der, 0);
  if (list.tag !== SEQUENCE) throw new Error('not a DER sequence');
  const tbs = element(der, list.start, list.end);
  if (tbs.tag !== SEQUENCE) throw new Error('no tbsCertList');
  let e = element(der, tbs.start, tbs.end);
  if (e.tag === INTEGER) e = element(der, e.end, tbs.end); // version
  if (e.tag !== SEQUENCE) throw new Error('no signature algorithm');
  const issuer = element(der, e.end, tbs.end);
  if (issuer.tag !== SEQUENCE) throw new Error('no issuer');
  const time = element(der, issuer.end, tbs.end);
  return { issuer: der.subarray(issuer.at, issuer.end).toString('hex'), issued: parseTime(der.subarray(time.start, time.end).toString('latin1'), time.tag) };
}

/** UTCTime (YYMMDDHHMMSSZ, years 1950–2049) or GeneralizedTime (YYYYMMDDHHMMSSZ), as RFC 5280 §4.1.2.5 writes them. */
function parseTime(text: string, tag: number): Date {
  const m = tag === UTC_TIME ? /^(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z$/.exec(text) : tag === GENERALIZED_TIME ? /^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z$/.exec(text) : null;
  if (!m) throw new Error('no thisUpdate time');
  const year = tag === UTC_TIME ? (Number(m[1]) < 50 ? 2000 : 1900) + Number(m[1]) : Number(m[1]);
  return new Date(Date.UTC(year, Number(m[2]) - 1, Number(m[3]), Number(m[4]), Number(m[5]), Number(m[6])));
}
