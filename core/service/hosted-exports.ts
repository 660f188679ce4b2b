/**
 * NBD exports the service hosts for its clients (`offload --server … nbd REF`): they outlive the
 * request that started them, and come back when the service starts again — each request is kept
 * in `<state>/hosted-exports.json` until the export is stopped (`nbd stop`, or an administrator's
 * request on its volume preempted it). One that cannot start again is logged and dropped, never
 * fatal: the service serves the rest.
 */
import { closeSync, existsSync, fsyncSync, openSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { z } from 'zod';
import type { Logger } from '../backend/plugin.js';
import type { Broker, ExportOptions } from '../broker-api.js';
import type { ListenAddress } from '../export/nbd-server.js';
import { assertWithin } from '../broker/exports.js';
import type { ExportInfo } from '../export/registry.js';
import type { JobInfo } from '../jobs/job.js';
import { PermissionDenied, toOffloadError } from '../model/errors.js';
import type { Principal } from '../locks/principal.js';
import type { HostedExportsApi } from './routes.js';
import { listenSchema } from './schemas.js';

const hostedSchema = z.object({
  name: z.string(),
  ref: z.string(),
  readOnly: z.boolean(),
  listen: listenSchema,
  principal: z.object({ id: z.string(), role: z.enum(['admin', 'tenant']) }),
  /** The only TLS clients it admits (as it started: a binding changed in the tokens file since does not widen it). */
  clients: z.array(z.string()).optional(),
  /** When `ref` was set (the export started, or a live copy switched it over): later switch-overs are found in the job records. */
  since: z.string().optional(),
});
type Hosted = z.infer<typeof hostedSchema>;
const fileSchema = z.object({ version: z.literal(1), exports: z.array(hostedSchema) });

export class HostedExports implements HostedExportsApi {
  private readonly file: string;
  private readonly hosted = new Map<string, Hosted>();
  private closing = false;
  /** A principal as the tokens file binds it now (its nbdClients). */
  private bind: (p: Principal) => Principal = (p) => p;

  constructor(stateDir: string, private readonly logger: Logger) {
    this.file = join(stateDir, 'hosted-exports.json');
  }

  async start(broker: Broker, ref: string, opts: ExportOptions): Promise<{ name: string; ref: string; uri: string; readOnly: boolean; clients?: string[] }> {
    const handle = await broker.exports.start(ref, opts);
    // Its principal as the tokens file binds it now: one read again while this started (the
    // request was let in under the old file) narrows it at once, as it narrowed those started before.
    const bound = this.bind(broker.principal).nbdClients;
    let admitted = handle.clients;
    if (bound && (!admitted || admitted.some((c) => !bound.includes(c)))) {
      admitted = (admitted ?? bound).filter((c) => bound.includes(c));
      try {
        if (admitted.length === 0) throw new PermissionDenied(`${broker.principal.id}'s exports admit only its NBD clients (${bound.join(', ')}), not ${(handle.clients ?? []).join(', ')}`);
        await broker.exports.setClients(handle.name, [...admitted]);
      } catch (e) {
        await handle.stop().catch(() => undefined);
        throw e;
      }
    }
    const clients = admitted ? { clients: [...admitted] } : {};
    const entry: Hosted = {
      name: handle.name, ref: handle.ref, readOnly: handle.readOnly, listen: asStarted(opts.listen, handle.uri), principal: { id: broker.principal.id, role: broker.principal.role },
      ...clients, since: new Date().toISOString(),
    };
    this.hosted.set(handle.name, entry);
    this.save();
    // A live copy switched it over: it comes back as the target (the job's record says so first, see restore).
    handle.onRetarget((to) => {
      if (this.hosted.get(entry.name) !== entry) return;
      entry.ref = to;
      entry.since = new Date().toISOString();
      this.save();
    });
    // Stopped other than by the service's shutdown (nbd stop, an administrator's preemption): forget it.
    void handle.stopped.then(() => this.forget(entry));
    return { name: handle.name, ref: handle.ref, uri: handle.uri, readOnly: handle.readOnly, ...clients };
  }

  async stop(broker: Broker, name: string, opts: { force?: boolean } = {}): Promise<void> {
    await broker.exports.stop(name, opts);
    const entry = this.hosted.get(name);
    if (entry) this.forget(entry);
  }

  /** Change the clients of an export: the entry of a hosted one too, so that it comes back admitting those. */
  async setClients(broker: Broker, name: string, clients: string[]): Promise<ExportInfo> {
    const entry = this.hosted.get(name);
    // Its owner as the tokens file binds it now (the broker knows the binding it started with);
    // to anyone but its owner and administrators the broker answers NotFound, as for any export.
    const owner = entry && (broker.principal.role === 'admin' || broker.principal.id === entry.principal.id) ? this.bind(entry.principal) : undefined;
    if (owner?.nbdClients && Array.isArray(clients)) assertWithin(owner, owner.nbdClients, clients);
    const info = await broker.exports.setClients(name, clients);
    if (entry) {
      entry.clients = [...(info.clients ?? clients)];
      this.save();
    }
    return info;
  }

  /**
   * The tokens file was read again (`bind`: a principal as it is bound now): each hosted export
   * admits from now on only those of its clients its principal's binding still names (a binding
   * never widens an export; narrowed to none, it admits no new client, and comes back no more).
   */
  async rebind(broker: Broker, bind: (p: Principal) => Principal): Promise<void> {
    this.bind = bind;
    for (const h of [...this.hosted.values()]) {
      const bound = bind(h.principal).nbdClients;
      if (!bound) continue;
      const clients = (h.clients ?? bound).filter((c) => bound.includes(c));
      if (h.clients && clients.length === h.clients.length) continue;
      try {
        await this.setClients(broker, h.name, clients);
        if (clients.length > 0) this.logger.info(`hosted export ${h.name}: ${h.principal.id}'s NBD clients changed; it admits ${clients.join(', ')} from now on`);
        else this.logger.warn(`hosted export ${h.name}: none of its clients is among ${h.principal.id}'s NBD clients (${bound.join(', ')}) any more; it admits no new client (those connected stay until \`offload nbd stop ${h.name}\`)`);
      } catch (e) {
        // Left as it is, it would admit clients the file no longer lets in: it stops instead.
        const err = toOffloadError(e);
        this.logger.error(`hosted export ${h.name}: its clients cannot be narrowed to ${h.principal.id}'s NBD clients (${err.code}: ${err.describe()}); it stops`, { export: h.name });
        await this.stop(broker, h.name).catch((s: unknown) => this.logger.error(`hosted export ${h.name} could not be stopped either: ${toOffloadError(s).message}`, { export: h.name }));
      }
    }
  }

  /**
   * Start again the exports hosted when the service last stopped (as the principals that asked).
   * `bind`: a principal as it is bound now (the tokens file's nbdClients): an export comes back
   * admitting its clients that the binding still names — none left, it admits none.
   */
  async restore(broker: Broker, bind: (p: Principal) => Principal = (p) => p): Promise<void> {
    this.bind = bind;
    const saved = this.read();
    if (saved.length === 0) return;
    const jobs = await broker.jobs.list().catch((e: unknown) => {
      this.logger.error(`the job records cannot be read; hosted exports start again from ${this.file} as it is: ${toOffloadError(e).message}`);
      return [];
    });
    const writable = new Map<string, Hosted['principal']>();
    // The sources of live copies whose service died come back with their writes held until the
    // resumed copy's write-intent record takes them in (or it cannot be resumed).
    const held = new Map<string, { promise: Promise<void>; release: () => void }>();
    const holdFor = (ref: string): Promise<void> | undefined => {
      const j = jobs.filter((x) => x.type === 'mirror' && x.crashed && pairsOf(x).some((p) => p.source === ref)).at(-1);
      if (!j) return undefined;
      if (!held.has(j.id)) {
        let release!: () => void;
        const promise = new Promise<void>((r) => { release = r; });
        held.set(j.id, { promise, release });
      }
      return held.get(j.id)!.promise;
    };
    for (const h of saved) {
      try {
        const ref = current(h, jobs);
        if (ref !== h.ref) this.logger.info(`hosted export ${h.name}: a live copy had switched it over from ${h.ref} to ${ref} (the job's record says so), so it serves ${ref}`);
        const hold = h.readOnly ? undefined : holdFor(ref);
        const principal = bind(h.principal);
        const bound = principal.nbdClients;
        const clients = h.clients && bound ? h.clients.filter((c) => bound.includes(c)) : h.clients;
        // Narrowed to none (`nbd clients NAME --none`, or its owner's binding): it comes back so,
        // holding its name and volume, for `nbd clients` to open again.
        if (h.clients?.length === 0) this.logger.info(`hosted export ${h.name} admits no client, as when the service stopped`);
        else if (clients?.length === 0) this.logger.warn(`hosted export ${h.name} admits no client: none of its clients (${h.clients!.join(', ')}) is among ${principal.id}'s NBD clients (${bound!.join(', ')}) any more`);
        await this.start(broker.as(principal), ref, { name: h.name, readOnly: h.readOnly, listen: h.listen, ...(clients ? { clients } : {}), ...(hold ? { holdWrites: hold } : {}) });
        if (!h.readOnly) writable.set(ref, h.principal);
        this.logger.info(`hosted export ${h.name} of ${ref} started again`);
      } catch (e) {
        const err = toOffloadError(e);
        this.logger.error(`hosted export ${h.name} of ${h.ref} cannot start again, dropped: ${err.code}: ${err.describe()}`, { export: h });
      }
    }
    this.save(); // the dropped ones are gone from the file
    try {
      await this.resumeLiveCopies(broker, jobs, writable, held);
    } finally {
      // Not resumed (a source not served again, a later copy went further, or it failed to start): the writes go on.
      for (const h of held.values()) h.release();
    }
  }

  /**
   * The live copies this service suspended when it stopped, or that it was running when it died,
   * copied on now that their sources are served again: each from the snapshots it left, or from
   * its write-intent record, as a new job of the same owner. One is left alone once a later live
   * copy of its volumes has gone further: still running, switched over, left points of its own,
   * or died with a write-intent record of its own (a later one that failed without any does not
   * count for a suspended one: its points are still the way on; for a crashed one any later copy
   * does: the writes during it are in no record it has). A crashed copy's sources hold their
   * writes (`held`) until the resumed job guards them, or it ends.
   */
  private async resumeLiveCopies(broker: Broker, jobs: JobInfo[], served: Map<string, Hosted['principal']>, held: Map<string, { release: () => void }>): Promise<void> {
    const mirrors = jobs.filter((j) => j.type === 'mirror').sort((a, b) => a.createdAt.localeCompare(b.createdAt));
    for (const j of mirrors) {
      const pairs = pairsOf(j);
      if (!(j.suspended || j.crashed) || pairs.length === 0 || !pairs.every((p) => served.has(p.source))) continue;
      // A crashed one's record stops counting once any later copy of its volumes ran: the writes
      // during that one were not recorded in it.
      const further = mirrors.some((o) => o.createdAt > j.createdAt && pairsOf(o).some((p) => pairs.some((q) => q.source === p.source || q.target === p.target))
        && (j.crashed === true || o.status !== 'concluded' || o.authoritative?.side === 'target' || (o.resumeSince ?? []).some((x) => x !== null) || o.crashed === true));
      if (further) continue;
      const why = j.suspended ? 'suspended when the service stopped' : 'its service died while it copied';
      try {
        // As the administrator: the broker keeps the job its owner's (a tenant's migration stays the tenant's).
        const job = await broker.liveCopy([], { resume: j.id, ...(j.speed ? { speed: j.speed } : {}) });
        const hold = held.get(j.id);
        if (hold) {
          held.delete(j.id);
          void job.wait().then(hold.release, hold.release);
        }
        this.logger.info(`live copy ${j.id} (${why}) resumed as job ${job.id}: ${pairs.map((p) => `${p.source} → ${p.target}`).join(', ')}`);
      } catch (e) {
        const err = toOffloadError(e);
        this.logger.error(`live copy ${j.id} (${why}) cannot be resumed: ${err.code}: ${err.describe()}`, { job: j.id });
      }
    }
  }

  /** The service is stopping: its exports stop with the broker but stay in the file, to come back. */
  shutdown(): void {
    this.closing = true;
  }

  private forget(entry: Hosted): void {
    if (this.closing || this.hosted.get(entry.name) !== entry) return;
    this.hosted.delete(entry.name);
    this.save();
  }

  private read(): Hosted[] {
    if (!existsSync(this.file)) return [];
    try {
      return fileSchema.parse(JSON.parse(readFileSync(this.file, 'utf8'))).exports;
    } catch (e) {
      this.logger.error(`${this.file} is unreadable, no hosted export is started again: ${(e as Error).message}`);
      return [];
    }
  }

  /** A crash or a power loss leaves the old file or the new one, never half of one (synced, then renamed, then the folder synced). */
  private save(): void {
    const tmp = `${this.file}.tmp`;
    const fd = openSync(tmp, 'w', 0o600);
    try {
      writeFileSync(fd, `${JSON.stringify({ version: 1, exports: [...this.hosted.values()] }, null, 2)}\n`);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, this.file);
    try {
      const dir = openSync(dirname(this.file), 'r');
      try {
        fsyncSync(dir);
      } finally {
        closeSync(dir);
      }
    } catch {
      // A filesystem that cannot sync a folder (some FUSE and 9p ones): the rename stands as it is.
    }
  }
}

/**
 * The volume an export must serve after a restart: its ref, or the target of a live copy of it
 * whose switch-over was recorded after the ref was (a crash between the job's record and this
 * file leaves the file behind; the record is what counts). Followed along later copies too.
 */
function current(h: Hosted, jobs: JobInfo[]): string {
  let ref = h.ref;
  let since = h.since ?? '';
  for (let hops = 0; hops < jobs.length; hops++) {
    const next = jobs
      .filter((j) => j.type === 'mirror' && j.createdAt >= since && j.authoritative?.side === 'target' && pairsOf(j).some((p) => p.source === ref))
      .sort((a, b) => a.createdAt.localeCompare(b.createdAt))[0];
    if (!next) break;
    ref = pairsOf(next).find((p) => p.source === ref)!.target;
    since = next.createdAt;
  }
  return ref;
}

/** A mirror job's pairs, as its params list them. */
function pairsOf(j: JobInfo): { source: string; target: string }[] {
  return Array.isArray(j.params.pairs) ? (j.params.pairs as { source: string; target: string }[]) : [];
}

/** Where an export listens, as it will listen again: a free port (0) becomes the port it got. */
function asStarted(listen: ListenAddress | undefined, uri: string): ListenAddress {
  if (listen && 'socket' in listen) return { socket: resolve(listen.socket) };
  const port = Number(new URL(uri).port);
  return { host: listen?.host ?? '127.0.0.1', port: listen?.port === 0 && port > 0 ? port : (listen?.port ?? 10809) };
}
