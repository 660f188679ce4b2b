/** The tokens file: principals, and a principal's NBD clients (`nbdClients`). */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../core/index.js';
import { Tokens } from '../../core/service/auth.js';

const dir = mkdtempSync(join(tmpdir(), 'offload-tokens-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function file(lines: string[]): string {
  const f = join(dir, `tokens-${Math.random().toString(16).slice(2)}.yaml`);
  writeFileSync(f, ['tokens:', ...lines].join('\n'), { mode: 0o600 });
  return f;
}

describe('tokens file', () => {
  it('nbdClients bind a principal\'s NBD exports to those TLS clients; a principal without is not bound', () => {
    const t = Tokens.load(file([
      '  - { token: aaaaaaaaaaaaaaaaaaaa, principal: tina, role: tenant, nbdClients: [kvm-1, kvm-2, kvm-1] }',
      '  - { token: bbbbbbbbbbbbbbbbbbbb, principal: ops, role: admin }',
    ]), silentLogger);
    expect(t.principalOf('Bearer aaaaaaaaaaaaaaaaaaaa')).toEqual({ id: 'tina', role: 'tenant', nbdClients: ['kvm-1', 'kvm-2'] });
    expect(t.principalOf('Bearer bbbbbbbbbbbbbbbbbbbb')).toEqual({ id: 'ops', role: 'admin' });
    // A principal that did not come by its token (an administrator acting as tina, a hosted export started again).
    expect(t.bound({ id: 'tina', role: 'tenant' })).toEqual({ id: 'tina', role: 'tenant', nbdClients: ['kvm-1', 'kvm-2'] });
    expect(t.bound({ id: 'tom', role: 'tenant', nbdClients: ['x'] })).toEqual({ id: 'tom', role: 'tenant' });
  });

  it('the binding is the principal\'s: its tokens must agree on it', () => {
    expect(() => Tokens.load(file([
      '  - { token: aaaaaaaaaaaaaaaaaaaa, principal: tina, role: tenant, nbdClients: [kvm-1] }',
      '  - { token: cccccccccccccccccccc, principal: tina, role: tenant }',
    ]), silentLogger)).toThrow(expect.objectContaining({ name: 'ConfigError', message: expect.stringMatching(/tokens\[1\]\.nbdClients: tina's tokens give it different NBD clients/) }));
    const same = Tokens.load(file([
      '  - { token: aaaaaaaaaaaaaaaaaaaa, principal: tina, role: tenant, nbdClients: [kvm-1, kvm-2] }',
      '  - { token: cccccccccccccccccccc, principal: tina, role: tenant, nbdClients: [kvm-2, kvm-1] }',
    ]), silentLogger);
    expect(same.principalOf('Bearer cccccccccccccccccccc')?.nbdClients).toEqual(['kvm-2', 'kvm-1']);
  });

  it('expires: a token is refused from then on (and said to have expired); a token expired already is warned of; a bad date is a ConfigError', () => {
    const warnings: string[] = [];
    const logger = { ...silentLogger, warn: (m: string) => { warnings.push(m); } };
    const later = new Date(Date.now() + 3_600_000).toISOString();
    const t = Tokens.load(file([
      `  - { token: aaaaaaaaaaaaaaaaaaaa, principal: tina, role: tenant, expires: "${later}" }`,
      '  - { token: bbbbbbbbbbbbbbbbbbbb, principal: tina, role: tenant, expires: "2020-01-01T00:00:00+01:00" }',
    ]), logger);
    expect(t.principalOf('Bearer aaaaaaaaaaaaaaaaaaaa')).toEqual({ id: 'tina', role: 'tenant' });
    expect(t.expired('Bearer aaaaaaaaaaaaaaaaaaaa')).toBe(false);
    expect(t.principalOf('Bearer bbbbbbbbbbbbbbbbbbbb')).toBeUndefined();
    expect(t.expired('Bearer bbbbbbbbbbbbbbbbbbbb')).toBe(true);
    expect(t.expired('Bearer cccccccccccccccccccc')).toBe(false); // not known: not "expired"
    expect(warnings).toEqual([expect.stringMatching(/tokens\[1\] \(tina\) expired at 2020-01-01T00:00:00\+01:00: it is refused/)]);
    for (const bad of ['tomorrow', '2027-01-01', '"2027-01-01T00:00:00"']) {
      expect(() => Tokens.load(file([`  - { token: aaaaaaaaaaaaaaaaaaaa, principal: tina, role: tenant, expires: ${bad} }`]), silentLogger))
        .toThrow(expect.objectContaining({ name: 'ConfigError', message: expect.stringMatching(/tokens\[0\]\.expires: expires is a date and time with its zone/) }));
    }
  });

  it('certificate: a client certificate\'s common name stands for its principal (never a bearer token); an entry gives a token or a certificate, once each', () => {
    const t = Tokens.load(file([
      '  - { certificate: backup-robot, principal: ops, role: admin }',
      '  - { token: aaaaaaaaaaaaaaaaaaaa, principal: tina, role: tenant }',
      '  - { certificate: "URI:spiffe://cluster/ns/vm/sa/kvm1", principal: tina, role: tenant }',
      '  - { certificate: "DNS:kvm1.example.com", principal: tina, role: tenant }',
    ]), silentLogger);
    expect(t.namesCertificates).toBe(true);
    expect(t.principalOfCertificate(['backup-robot'])).toEqual({ id: 'ops', role: 'admin' });
    expect(t.principalOfCertificate(['tina'])).toBeUndefined();
    expect(t.principalOfCertificate([])).toBeUndefined();
    // Subject alternative names: one certificate's names may pick entries of one principal, not two.
    expect(t.principalOfCertificate(['URI:spiffe://cluster/ns/vm/sa/kvm1', 'DNS:kvm1.example.com'])).toEqual({ id: 'tina', role: 'tenant' });
    expect(t.principalOfCertificate(['DNS:kvm1.example.com'])).toEqual({ id: 'tina', role: 'tenant' });
    expect(t.principalOfCertificate(['backup-robot', 'DNS:kvm1.example.com'])).toBeUndefined();
    expect(t.principalOfCertificate(['kvm1.example.com'])).toBeUndefined(); // a common name is not a DNS name
    // Written in another case, compared in one; one name of an administrator and one of a tenant of the same id: neither.
    const u = Tokens.load(file([
      '  - { certificate: "DNS:KVM2.example.com", principal: ops, role: tenant }',
      '  - { certificate: ops-admin, principal: ops, role: admin }',
    ]), silentLogger);
    expect(u.principalOfCertificate(['DNS:kvm2.example.com'])).toEqual({ id: 'ops', role: 'tenant' });
    expect(u.principalOfCertificate(['ops-admin', 'DNS:kvm2.example.com'])).toBeUndefined();
    expect(() => Tokens.load(file(['  - { certificate: "dns:kvm3", principal: ops, role: admin }']), silentLogger)).toThrow(/tokens\[0\]: "dns:kvm3": a subject alternative name is written DNS:/);
    expect(t.principalOf('Bearer backup-robot')).toBeUndefined();
    for (const [lines, message] of [
      [['  - { principal: tina, role: tenant }'], /tokens\[0\]: give a token or a certificate/],
      [['  - { token: aaaaaaaaaaaaaaaaaaaa, certificate: x, principal: tina, role: tenant }'], /tokens\[0\]: give a token or a certificate/],
      [['  - { certificate: x, principal: a, role: admin }', '  - { certificate: x, principal: b, role: admin }'], /tokens\[1\]: the same certificate is given twice/],
    ] as [string[], RegExp][]) {
      expect(() => Tokens.load(file(lines), silentLogger)).toThrow(expect.objectContaining({ name: 'ConfigError', message: expect.stringMatching(message) }));
    }
  });

  it('an empty or blank nbdClients is a ConfigError naming it', () => {
    for (const bad of ['[]', '[""]', 'kvm-1']) {
      expect(() => Tokens.load(file([`  - { token: aaaaaaaaaaaaaaaaaaaa, principal: tina, role: tenant, nbdClients: ${bad} }`]), silentLogger))
        .toThrow(expect.objectContaining({ name: 'ConfigError', message: expect.stringMatching(/tokens\[0\]\.nbdClients/) }));
    }
  });
});
