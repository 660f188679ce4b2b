/**
 * The names a client certificate stands for (core/export/cert-names.ts): its common name and its
 * subject alternative names as Node prints them (`subjectaltname`, with JSON-quoted values where
 * they hold a comma or a quote). The real certificates' cases: nbd-tls-access and service-tls.
 */
import type { PeerCertificate } from 'node:tls';
import { describe, expect, it } from 'vitest';
import { certificateNames, subjectAltNames } from '../../core/export/cert-names.js';

const cert = (cn: unknown, san?: string) => ({ subject: cn === undefined ? {} : { CN: cn }, ...(san !== undefined ? { subjectaltname: san } : {}) }) as unknown as PeerCertificate;

describe('certificate names', () => {
  it('subject alternative names with their kinds; quoted values read as JSON; other kinds left out', () => {
    expect(subjectAltNames('DNS:kvm1.example.com, IP Address:10.0.0.7, IP Address:0:0:0:0:0:0:0:1, URI:spiffe://c/ns/vm/sa/kvm1, email:ops@example.com'))
      .toEqual(['DNS:kvm1.example.com', 'IP:10.0.0.7', 'IP:0:0:0:0:0:0:0:1', 'URI:spiffe://c/ns/vm/sa/kvm1', 'email:ops@example.com']);
    expect(subjectAltNames('DNS:"a, DNS:b", URI:"x\\"y", DirName:"CN=foo,O=bar", othername:1.2.3;UTF8:z, DNS:c')).toEqual(['DNS:a, DNS:b', 'URI:x"y', 'DNS:c']);
    expect(subjectAltNames(undefined)).toEqual([]);
    expect(subjectAltNames('')).toEqual([]);
  });

  it('the common name as it is, if there is one and only one, and not one written as an alternative name', () => {
    expect(certificateNames(cert('alice', 'DNS:kvm1'))).toEqual(['alice', 'DNS:kvm1']);
    expect(certificateNames(cert(undefined, 'URI:spiffe://x'))).toEqual(['URI:spiffe://x']);
    expect(certificateNames(cert(['a', 'b']))).toEqual([]);
    expect(certificateNames(cert('DNS:kvm1'))).toEqual([]);
    expect(certificateNames(undefined)).toEqual([]);
  });
});
