/**
 * A running broker's config changed (`broker.reconfigure`, `offload serve` on SIGHUP): backends
 * added, changed and taken away without a restart, which would cut every client of its exports.
 */
import type { BackendEntry, BackendFactory, Logger } from '../backend/plugin.js';
import type { StorageBackend } from '../backend/storage-backend.js';
import type { Reconfigured } from '../broker-api.js';
import type { BrokerConfig } from '../config/config.js';
import { ConfigError } from '../config/config-error.js';
import { secrets } from '../config/secrets.js';
import { Timeout, toOffloadError } from '../model/errors.js';
import type { PlannerBackend } from '../planner/planner.js';
import type { BrokerState } from './state.js';

/** Make the backend a config entry describes (ConfigError naming it when it cannot start). */
export async function startBackend(factory: BackendFactory<object>, entry: BackendEntry, env: { stateDir: string; baseDir: string; logger: Logger }): Promise<PlannerBackend> {
  let backend: StorageBackend;
  try {
    backend = await factory.create(entry, env);
  } catch (e) {
    const err = toOffloadError(e);
    throw new ConfigError(secrets.redact(`backend "${entry.name}" (${entry.kind}) cannot start: ${err.message}`), err.hint);
  }
  try {
    return { backend, capabilities: await backend.capabilities() };
  } catch (e) {
    await backend.close?.().catch(() => undefined);
    throw new ConfigError(secrets.redact(`backend "${entry.name}" (${entry.kind}) cannot tell its capabilities: ${toOffloadError(e).message}`));
  }
}

/** How long a backend made by a reconfiguration has to answer its first request. */
const PROBE_MS = 10_000;

/**
 * A backend made to take a running one's place, or to join them, is asked for one volume before
 * it is used (a plugin connects when first called, so a mistyped password or endpoint would
 * otherwise surface as every operation failing): its error, or Timeout after PROBE_MS.
 */
async function probe(name: string, b: PlannerBackend): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Timeout(`it did not answer within ${PROBE_MS / 1000} s`)), PROBE_MS);
  });
  try {
    await Promise.race([b.backend.listVolumes({ limit: 1 }), late]);
  } catch (e) {
    await b.backend.close?.().catch(() => undefined);
    throw new ConfigError(secrets.redact(`backend "${name}" (${b.backend.kind}) cannot be used: ${toOffloadError(e).message}`));
  } finally {
    clearTimeout(timer);
  }
}

/** Settings a running broker keeps until it restarts: its state, its identity, its jobs' leases, lock waits and retention. */
const RESTART_ONLY: { key: string; of: (c: BrokerConfig) => unknown }[] = [
  { key: 'state', of: (c) => [c.database, c.state] },
  { key: 'server', of: (c) => c.server },
  { key: 'hostId', of: (c) => c.hostId },
  { key: 'leaseSeconds', of: (c) => c.leaseSeconds },
  { key: 'lockWaitSeconds', of: (c) => c.lockWaitSeconds },
  { key: 'jobRetentionDays', of: (c) => c.jobRetentionDays },
];

/**
 * Apply `next` (validated) to the broker, one reconfiguration at a time:
 * - a backend new to the config is made; one whose entry changed (another endpoint, a rotated
 *   password) is made anew and takes the old one's place for every operation from now on — once
 *   this broker holds no lock on its volumes (no export, job or operation: until then it is in
 *   `kept`, and a later reconfiguration replaces it); the old one is closed with the broker;
 * - a backend left out is taken away unless this broker holds a lock on one of its volumes (an
 *   export, a job, an operation): then it stays, with the reason in `kept`, draining — what runs
 *   on it goes on, nothing new starts (BrokerState.draining); once idle, the next
 *   reconfiguration takes it away. Jobs of other brokers are theirs: this one only stops taking
 *   over those on a backend it no longer has (BrokerState.placement);
 * - an entry whose backend cannot start is in `failed`, and what was in use stays;
 * - `nbd.tls` with the same kind (and verifyPeer) is read again with its new settings (a folder,
 *   an `allow` list); turning it on, off or to another kind needs a restart, as do the state,
 *   hostId, leaseSeconds and lockWaitSeconds (`restartNeeded`: the ones in use stay).
 */
export function reconfigure(s: BrokerState, next: BrokerConfig): Promise<Reconfigured> {
  return s.mutex.run(['reconfigure'], async () => {
    s.assertOpen();
    const old = s.config;
    const out: Reconfigured = { added: [], replaced: [], removed: [], kept: [], failed: [], restartNeeded: [] };
    for (const r of RESTART_ONLY) if (!sameValue(r.of(old), r.of(next))) out.restartNeeded.push(r.key);
    let nbd = old.nbd;
    if (!sameValue(old.nbd?.tls, next.nbd?.tls)) {
      try {
        if (s.nbdTls && next.nbd?.tls && s.nbdTls.change(next.nbd.tls)) nbd = next.nbd;
        else out.restartNeeded.push('nbd.tls');
      } catch (e) {
        out.failed.push({ name: 'nbd.tls', reason: (e as Error).message });
      }
    }

    // Every backend to make first, then the swap at once: an operation sees the old set or the new.
    const current = new Map(old.backends.map((e) => [e.name, e]));
    const made = new Map<string, PlannerBackend>();
    for (const entry of next.backends) {
      const was = current.get(entry.name);
      if (was && sameValue(was, entry)) continue;
      // A job looks its backend up by name at every step: one replaced under it would go on
      // against another array or pool (and its clean-up delete a volume there).
      const users = was ? usersHere(s, entry.name) : undefined;
      if (users) {
        out.kept.push({ name: entry.name, reason: `its entry changed, but it is in use here: ${users}` });
        continue;
      }
      try {
        const b = await startBackend(s.factories.get(entry.kind)!, entry, { stateDir: old.state, baseDir: next.baseDir, logger: s.logger });
        await probe(entry.name, b);
        made.set(entry.name, b);
      } catch (e) {
        out.failed.push({ name: entry.name, reason: (e as Error).message });
      }
    }
    if (s.closed) {
      await Promise.allSettled([...made.values()].map((b) => b.backend.close?.()));
      s.assertOpen();
    }
    const wanted = new Set(next.backends.map((e) => e.name));
    for (const name of wanted) s.draining.delete(name); // configured again: it takes new work
    const unused: PlannerBackend[] = [];
    for (const name of current.keys()) {
      if (wanted.has(name)) continue;
      const users = usersHere(s, name);
      if (users) {
        out.kept.push({ name, reason: `it is no longer configured, but it is in use here (nothing new starts on it): ${users}` });
        s.draining.add(name);
        continue;
      }
      s.retire(s.backends.get(name)!.backend);
      s.backends.delete(name);
      s.draining.delete(name);
      out.removed.push(name);
    }
    for (const [name, b] of made) {
      const was = s.backends.get(name);
      // Taken into use while the new one was made: it stays, and the new one goes.
      const users = was ? usersHere(s, name) : undefined;
      if (users) {
        out.kept.push({ name, reason: `its entry changed, but it is in use here: ${users}` });
        made.delete(name);
        unused.push(b);
        continue;
      }
      if (was) s.retire(was.backend);
      s.backends.set(name, b);
      (was ? out.replaced : out.added).push(name);
    }
    await Promise.allSettled(unused.map((b) => b.backend.close?.()));

    // What is in use now, as a config: the new entries made, the old ones kept or failed to replace.
    const inUse = (name: string): BackendEntry & Record<string, unknown> =>
      made.has(name) ? next.backends.find((e) => e.name === name)! : current.get(name)!;
    s.config = {
      ...old, baseDir: next.baseDir, backends: [...s.backends.keys()].map(inUse),
      ...(nbd ? { nbd } : {}),
    };
    const said = [
      ...out.added.map((n) => `backend ${n} added`), ...out.replaced.map((n) => `backend ${n} replaced`), ...out.removed.map((n) => `backend ${n} removed`),
      ...(nbd !== old.nbd ? ['nbd.tls changed'] : []),
    ];
    if (said.length > 0) s.logger.info(`config: ${said.join(', ')}`);
    for (const k of out.kept) s.logger.warn(`config: backend ${k.name} stays as it is: ${k.reason}`);
    for (const f of out.failed) s.logger.error(`config: ${f.name} not changed, the one in use stays: ${f.reason}`);
    if (out.restartNeeded.length > 0) s.logger.warn(`config: ${out.restartNeeded.join(', ')} changed; the ones in use stay until a restart`);
    return out;
  });
}

/** What of this broker holds a lock on one of a backend's volumes (its exports, jobs, operations), or undefined. */
function usersHere(s: BrokerState, backend: string): string | undefined {
  const users = [...new Set(s.locks.heldHere().filter((h) => h.key.startsWith(`${backend}/`)).map((h) => h.holder.description))];
  return users.length > 0 ? users.join('; ') : undefined;
}

/** Two config values alike: JSON with keys in order (entries are plain data). */
function sameValue(a: unknown, b: unknown): boolean {
  return canonical(a) === canonical(b);
}

function canonical(v: unknown): string {
  return JSON.stringify(v, (_, x: unknown) => (x && typeof x === 'object' && !Array.isArray(x)
    ? Object.fromEntries(Object.entries(x as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)))
    : x)) ?? 'undefined';
}
