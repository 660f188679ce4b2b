/**
 * Who a request over TCP is: `Authorization: Bearer TOKEN`, or (HTTPS with a client CA) a verified
 * client certificate's names (common name, subject alternative names), looked up in the tokens file.
 *
 *   tokens:
 *     - token: 9c1f0e…            # at least 16 characters; generate with `openssl rand -hex 32`
 *       principal: alice
 *       role: tenant              # tenant: its own volumes and jobs only; admin: everything
 *       nbdClients: [alice-kvm1]  # optional: its NBD exports admit only these TLS clients
 *       expires: 2027-06-30T00:00:00Z  # optional: refused from then on (401 "has expired")
 *     - token: 51aa7d…
 *       principal: ops
 *       role: admin
 *     - certificate: backup-robot   # a client certificate's common name, or a subject alternative name ("URI:spiffe://…", "DNS:…"; HTTPS with --tls-client-ca)
 *       principal: ops
 *       role: admin
 *
 * The file holds secrets: one that others may read or write is refused (chmod 600), one the group
 * may read is used with a warning. Tokens are compared in constant time (their SHA-256 digests,
 * every entry, no early exit), so the answer's timing tells nothing about a token.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { statSync } from 'node:fs';
import { resolve } from 'node:path';
import { z } from 'zod';
import type { Logger } from '../backend/plugin.js';
import { readConfigFile } from '../config/config.js';
import { ConfigError } from '../config/config-error.js';
import { describeIssue, formatPath } from '../config/format-issues.js';
import { secrets } from '../config/secrets.js';
import { clientName } from '../export/cert-names.js';
import { tenant, type Principal } from '../locks/principal.js';

const tokensFileSchema = z.strictObject({
  tokens: z.array(z.strictObject({
    token: z.string().min(16, 'a token has at least 16 characters').optional(),
    certificate: z.string().min(1).max(255).optional(),
    principal: z.string().min(1),
    role: z.enum(['admin', 'tenant']),
    nbdClients: z.array(z.string().min(1).max(255)).min(1).optional(),
    expires: z.iso.datetime({ offset: true, error: 'expires is a date and time with its zone, e.g. 2027-06-30T00:00:00Z' }).optional(),
  }).refine((t) => (t.token === undefined) !== (t.certificate === undefined), 'give a token or a certificate (a client certificate\'s common name, or DNS:…/URI:… name), one of them')),
});

/** A token (its digest) or a client certificate (one of its names: certificateNames), and whom it names. */
interface Entry { digest?: Buffer; certificate?: string; principal: Principal; expiresAt?: number }

export class Tokens {
  /** Each bound principal's NBD clients, by `role:id` (one binding per principal, whichever token it came by). */
  private readonly bindings = new Map<string, readonly string[]>();

  private constructor(private readonly entries: readonly Entry[]) {
    for (const e of entries) if (e.principal.nbdClients) this.bindings.set(`${e.principal.role}:${e.principal.id}`, e.principal.nbdClients);
  }

  /**
   * A principal with the binding the file gives it (its `nbdClients`): for one that did not come
   * by its own token — an administrator acting as a tenant, a hosted export started again.
   */
  bound(p: Principal): Principal {
    const clients = this.bindings.get(`${p.role}:${p.id}`);
    const { nbdClients: _, ...rest } = p;
    return clients ? { ...rest, nbdClients: clients } : rest;
  }

  /** Read and check a tokens file (ConfigError naming the problem: exit 2 for `offload serve`). */
  static load(file: string, logger: Logger): Tokens {
    const path = resolve(file);
    let mode: number;
    try {
      mode = statSync(path).mode;
    } catch (e) {
      throw new ConfigError(`tokens file ${path}: ${(e as Error).message}`);
    }
    if (mode & 0o007) throw new ConfigError(`tokens file ${path} may be read or written by others (mode ${(mode & 0o777).toString(8)})`, `chmod 600 ${path}`);
    if (mode & 0o070) logger.warn(`tokens file ${path} may be read by its group (mode ${(mode & 0o777).toString(8)}); chmod 600 keeps the tokens to the service's user`);
    const { raw } = readConfigFile(path);
    const tokens = (raw as { tokens?: unknown } | null)?.tokens;
    if (Array.isArray(tokens)) for (const t of tokens) secrets.add((t as { token?: unknown } | null)?.token);
    const parsed = tokensFileSchema.safeParse(raw);
    if (!parsed.success) {
      const first = parsed.error.issues[0]!;
      throw new ConfigError(secrets.redact(`tokens file ${path}: ${formatPath('', first.path)}: ${describeIssue(first)}`), 'expected tokens: [{ token | certificate, principal, role: admin | tenant, nbdClients?: [NAME…], expires?: DATETIME }]');
    }
    const seen = new Set<string>();
    const bindings = new Map<string, string>();
    const entries = parsed.data.tokens.map((raw, i) => {
      // Names as certificates' names are compared (clientName): `DNS:` in lower case, IPv6 compressed.
      let t = raw;
      try {
        t = { ...raw, ...(raw.certificate !== undefined ? { certificate: clientName(raw.certificate) } : {}), ...(raw.nbdClients ? { nbdClients: raw.nbdClients.map(clientName) } : {}) };
      } catch (e) {
        throw new ConfigError(`tokens file ${path}: tokens[${i}]: ${(e as Error).message}`);
      }
      const id = t.token !== undefined ? `token ${t.token}` : `certificate ${t.certificate!}`;
      if (seen.has(id)) throw new ConfigError(`tokens file ${path}: tokens[${i}]: the same ${t.token !== undefined ? 'token' : 'certificate'} is given twice`);
      seen.add(id);
      // A principal's NBD clients bind the principal, not one of its tokens: its tokens must agree.
      const binding = JSON.stringify([...new Set(t.nbdClients ?? [])].sort());
      const key = `${t.role}:${t.principal}`;
      if (bindings.has(key) && bindings.get(key) !== binding) {
        throw new ConfigError(`tokens file ${path}: tokens[${i}].nbdClients: ${t.principal}'s tokens give it different NBD clients`, 'give every token of one principal the same nbdClients (or none)');
      }
      bindings.set(key, binding);
      let principal: Principal;
      try {
        principal = t.role === 'admin' ? { id: t.principal, role: 'admin' } : tenant(t.principal);
        if (t.nbdClients) principal = { ...principal, nbdClients: Object.freeze([...new Set(t.nbdClients)]) };
      } catch (e) {
        throw new ConfigError(`tokens file ${path}: tokens[${i}].principal: ${(e as Error).message}`);
      }
      const expiresAt = t.expires === undefined ? undefined : Date.parse(t.expires);
      if (expiresAt !== undefined && expiresAt <= Date.now()) logger.warn(`tokens file ${path}: tokens[${i}] (${t.principal}) expired at ${t.expires}: it is refused`);
      return { ...(t.token !== undefined ? { digest: digest(t.token) } : { certificate: t.certificate! }), principal, ...(expiresAt !== undefined ? { expiresAt } : {}) };
    });
    return new Tokens(entries);
  }

  /** The principal of an `Authorization` header's bearer token; undefined when absent, unknown or expired. */
  principalOf(authorization: string | undefined): Principal | undefined {
    const e = this.entryOf(authorization);
    return e && !expired(e) ? e.principal : undefined;
  }

  /** Whether the header's bearer token is one of the file's, past its `expires` (for the 401's message). */
  expired(authorization: string | undefined): boolean {
    const e = this.entryOf(authorization);
    return e !== undefined && expired(e);
  }

  private entryOf(authorization: string | undefined): Entry | undefined {
    const m = /^Bearer\s+(\S+)\s*$/i.exec(authorization ?? '');
    if (!m) return undefined;
    const d = digest(m[1]!);
    let found: Entry | undefined;
    for (const e of this.entries) if (e.digest && timingSafeEqual(e.digest, d) && !found) found = e;
    return found;
  }

  /**
   * The principal a verified client certificate stands for: the entry whose `certificate` is one
   * of its names (certificateNames: its common name, `DNS:…`, `URI:…`); undefined when none is,
   * it expired, or its names pick entries of more than one principal (which would be a guess).
   * For a request without a bearer token.
   */
  principalOfCertificate(names: readonly string[]): Principal | undefined {
    const found = this.entries.filter((x) => x.certificate !== undefined && names.includes(x.certificate));
    if (new Set(found.map((e) => `${e.principal.role}:${e.principal.id}`)).size !== 1) return undefined;
    const e = found.find((x) => !expired(x));
    return e?.principal;
  }

  /** Whether the entries naming a certificate (by any of its names) are past their `expires` (for the 401's message). */
  certificateExpired(names: readonly string[]): boolean {
    const found = this.entries.filter((x) => x.certificate !== undefined && names.includes(x.certificate));
    return found.length > 0 && found.every(expired);
  }

  /** Whether any entry names a client certificate (the service then asks clients for one). */
  get namesCertificates(): boolean {
    return this.entries.some((e) => e.certificate !== undefined);
  }
}

function expired(e: Entry): boolean {
  return e.expiresAt !== undefined && Date.now() >= e.expiresAt;
}

function digest(token: string): Buffer {
  return createHash('sha256').update(token).digest();
}
