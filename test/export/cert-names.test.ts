/**
 * The names a client certificate stands for (core/export/cert-names.ts): its common name and its
 * subject alternative names as Node prints them (`subjectaltname`, with JSON-quoted values where
 * they hold a comma or a quote). The real certificates' cases: nbd-tls-access and service-tls.
 */
import type { PeerCertificate } from 'node:tls';
import { describe, expect, it } from 'vitest';
import { certificateNames, clientName, subjectAltNames } from '../../core/export/cert-names.js';
import { caSubjects, olderCrl, readCrls } from '../../core/export/crl.js';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

const cert = (cn: unknown, san?: string) => ({ subject: cn === undefined ? {} : { CN: cn }, ...(san !== undefined ? { subjectaltname: san } : {}) }) as unknown as PeerCertificate;

describe('certificate names', () => {
  it('subject alternative names with their kinds; quoted values read as JSON; other kinds left out', () => {
    expect(subjectAltNames('DNS:kvm1.example.com, IP Address:10.0.0.7, IP Address:0:0:0:0:0:0:0:1, URI:spiffe://c/ns/vm/sa/kvm1, email:ops@example.com'))
      .toEqual(['DNS:kvm1.example.com', 'IP:10.0.0.7', 'IP:::1', 'URI:spiffe://c/ns/vm/sa/kvm1', 'email:ops@example.com']);
    expect(subjectAltNames('DNS:"a, DNS:b", URI:"x\\"y", DirName:"CN=foo,O=bar", othername:1.2.3;UTF8:z, DNS:c')).toEqual(['DNS:a, dns:b', 'URI:x"y', 'DNS:c']); // one name (DNS in lower case), not two
    // A kind this does not read (digits in its name) does not end the list; DNS in lower case, IPv6 compressed.
    expect(subjectAltNames('X400Name:<unsupported>, DNS:KVM1.Example.COM, IP Address:FE80:0:0:0:0:0:0:1')).toEqual(['DNS:kvm1.example.com', 'IP:fe80::1']);
    expect(subjectAltNames(undefined)).toEqual([]);
    expect(subjectAltNames('')).toEqual([]);
  });

  it('the common name as it is, if there is one and only one, and not one written as an alternative name', () => {
    expect(certificateNames(cert('alice', 'DNS:kvm1'))).toEqual(['alice', 'DNS:kvm1']);
    expect(certificateNames(cert(undefined, 'URI:spiffe://x'))).toEqual(['URI:spiffe://x']);
    expect(certificateNames(cert(['a', 'b']))).toEqual([]);
    expect(certificateNames(cert('DNS:kvm1'))).toEqual([]);
    expect(certificateNames(cert('dns:kvm1'))).toEqual([]);
    expect(certificateNames(undefined)).toEqual([]);
  });

  it('names as written: alternative names in the form certificates are compared in; a kind misspelt is refused', () => {
    expect(['alice', 'vm:alice', 'DNS:Kvm1.Example.com', 'IP:0:0:0:0:0:0:0:1', 'IP:10.0.0.7', 'URI:spiffe://c/x'].map(clientName))
      .toEqual(['alice', 'vm:alice', 'DNS:kvm1.example.com', 'IP:::1', 'IP:10.0.0.7', 'URI:spiffe://c/x']);
    for (const bad of ['dns:kvm1', 'Email:a@b', 'IP Address:10.0.0.7', 'uri:spiffe://x']) {
      expect(() => clientName(bad)).toThrow(/a subject alternative name is written DNS:…, URI:…, email:… or IP:…/);
    }
  });

  it("a CA file that cannot be read names no CA: every issuer's list must go on", () => {
    const T = join(import.meta.dirname, '../support/tls');
    const lists = readCrls(readFileSync(join(T, 'server-crl', 'ca-crl.pem')), 'x');
    expect(caSubjects(readFileSync(join(T, 'server', 'ca-cert.pem')))?.has(lists[0]!.issuer)).toBe(true);
    const trusted = readFileSync(join(T, 'server', 'ca-cert.pem'), 'utf8').replaceAll('CERTIFICATE', 'TRUSTED CERTIFICATE');
    expect(caSubjects(trusted)?.has(lists[0]!.issuer)).toBe(true);
    expect(caSubjects('-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n')).toBeUndefined();
    expect(olderCrl(lists, [], undefined)).toMatch(/no list of an issuer/);
    expect(olderCrl(lists, [], new Set())).toBeUndefined(); // its CA no longer trusted
  });
});
