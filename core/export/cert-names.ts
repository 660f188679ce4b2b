/**
 * The names a verified client certificate stands for, as `clients`, `allow` and a tokens file's
 * `certificate:` write them: its subject's common name as it is (`alice`), and each subject
 * alternative name with its kind (`DNS:kvm1.example.com`, `URI:spiffe://cluster/ns/vm/sa/kvm1`,
 * `email:ops@example.com`, `IP:10.0.0.7`, `IP:fe80::1`) — what cert-manager and SPIFFE issue,
 * often with no common name at all. DNS names and IP addresses are compared in one canonical form
 * (lower case; IPv6 compressed), on both sides: clientName for what a config or a caller writes.
 */
import { isIPv6 } from 'node:net';
import type { PeerCertificate } from 'node:tls';
import { InvalidArgument } from '../model/errors.js';

/** Kinds of subject alternative names as Node prints them, and as they are written here. */
const KINDS: Record<string, string> = { DNS: 'DNS', URI: 'URI', email: 'email', 'IP Address': 'IP' };
const WRITTEN = new Set(['DNS', 'URI', 'email', 'IP']);
/** A prefix that reads as a kind of alternative name, in any case or as Node prints it. */
const LOOKS_LIKE_KIND = /^(dns|uri|email|ip|ip address):/i;

export function certificateNames(cert: PeerCertificate | undefined): string[] {
  if (!cert) return [];
  const cn = cert.subject?.CN;
  // One common name, or none counted (several would be a guess); not one written as an
  // alternative name is (`DNS:…`), which it would stand in for.
  const named = typeof cn === 'string' && cn.length > 0 && !LOOKS_LIKE_KIND.test(cn);
  return [...(named ? [cn] : []), ...subjectAltNames(cert.subjectaltname)];
}

/**
 * Node's `subjectaltname`: `DNS:a, URI:b, IP Address:1.2.3.4`, entries split by `, `, a value
 * with a comma, quote or backslash in it written as a JSON string (as Node escapes them since
 * CVE-2021-44532), so a value cannot carry a second entry. Kinds other than those above
 * (directory names, other names, X400Name) are passed over.
 */
export function subjectAltNames(text: string | undefined): string[] {
  const out: string[] = [];
  const s = text ?? '';
  const entry = /([A-Za-z][A-Za-z0-9 ]*):("(?:[^"\\]|\\.)*"|[^,]*)(?:, |$)/y;
  let at = 0;
  while (at < s.length) {
    entry.lastIndex = at;
    const m = entry.exec(s);
    if (!m) {
      // Not an entry this reads: on to the next one.
      const next = s.indexOf(', ', at);
      if (next < 0) break;
      at = next + 2;
      continue;
    }
    at = entry.lastIndex;
    const kind = KINDS[m[1]!];
    let value = m[2]!;
    if (value.startsWith('"')) {
      try {
        value = JSON.parse(value) as string;
      } catch {
        continue;
      }
    }
    if (kind && value.length > 0) out.push(canonical(kind, value));
    if (m[0].length === 0) break;
  }
  return out;
}

/**
 * A client's name as a config, a tokens file or a caller writes it (`clients`, `allow`,
 * `certificate:`, `nbdClients`), in the form certificates' names are compared in. A common name
 * or PSK identity is taken as it is; an alternative name must be written `DNS:`, `URI:`, `email:`
 * or `IP:` (InvalidArgument for `dns:…`, `IP Address:…`: such a name would never match).
 */
export function clientName(name: string): string {
  const colon = name.indexOf(':');
  const kind = colon > 0 ? name.slice(0, colon) : '';
  if (WRITTEN.has(kind)) return canonical(kind, name.slice(colon + 1));
  if (LOOKS_LIKE_KIND.test(name)) {
    throw new InvalidArgument(`${JSON.stringify(name)}: a subject alternative name is written DNS:…, URI:…, email:… or IP:…`, {
      hint: 'as in DNS:kvm1.example.com, URI:spiffe://cluster/ns/vm/sa/kvm1, IP:10.0.0.7',
    });
  }
  return name;
}

function canonical(kind: string, value: string): string {
  if (kind === 'DNS') return `DNS:${value.toLowerCase()}`;
  if (kind === 'IP' && isIPv6(value)) return `IP:${new URL(`http://[${value}]`).hostname.slice(1, -1)}`;
  return `${kind}:${value}`;
}
