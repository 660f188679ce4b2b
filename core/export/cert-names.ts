/**
 * The names a verified client certificate stands for, as `clients`, `allow` and a tokens file's
 * `certificate:` write them: its subject's common name as it is (`alice`), and each subject
 * alternative name with its kind (`DNS:kvm1.example.com`, `URI:spiffe://cluster/ns/vm/sa/kvm1`,
 * `email:ops@example.com`, `IP:10.0.0.7`) — what cert-manager and SPIFFE issue, often with no
 * common name at all.
 */
import type { PeerCertificate } from 'node:tls';

/** Kinds of subject alternative names as Node prints them, and as they are written here. */
const KINDS: Record<string, string> = { DNS: 'DNS', URI: 'URI', email: 'email', 'IP Address': 'IP' };

export function certificateNames(cert: PeerCertificate | undefined): string[] {
  if (!cert) return [];
  const cn = cert.subject?.CN;
  // One common name, or none counted (several would be a guess); not one written as an
  // alternative name is (`DNS:…`), which it would stand in for.
  const named = typeof cn === 'string' && cn.length > 0 && !/^(DNS|URI|email|IP):/.test(cn);
  return [...(named ? [cn] : []), ...subjectAltNames(cert.subjectaltname)];
}

/**
 * Node's `subjectaltname`: `DNS:a, URI:b, IP Address:1.2.3.4`, a value with a comma, quote or
 * backslash in it written as a JSON string (as Node escapes them since CVE-2021-44532). Kinds
 * other than those above (directory names, other names) are left out.
 */
export function subjectAltNames(text: string | undefined): string[] {
  const out: string[] = [];
  const entry = /([A-Za-z][A-Za-z ]*):("(?:[^"\\]|\\.)*"|[^,]*)(?:, |$)/y;
  for (let m = entry.exec(text ?? ''); m; m = entry.exec(text ?? '')) {
    const kind = KINDS[m[1]!];
    let value = m[2]!;
    if (value.startsWith('"')) {
      try {
        value = JSON.parse(value) as string;
      } catch {
        continue;
      }
    }
    if (kind && value.length > 0) out.push(`${kind}:${value}`);
    if (entry.lastIndex >= (text ?? '').length) break;
  }
  return out;
}
