/**
 * The exports one broker serves: which device is served under which name, on which server, for
 * whom, and what to undo when it stops. One NbdServer per listen address, shared by the exports
 * on it and closed with the last of them. Policy (who may export what, which locks) is the
 * broker's (core/broker/exports.ts); this is the mechanism.
 */
import type { BlockDevice } from '../backend/block-device.js';
import { KeyedMutex } from '../keyed-mutex.js';
import type { Principal } from '../locks/principal.js';
import { AlreadyExists, FailedPrecondition, InvalidArgument, NotFound } from '../model/errors.js';
import { NbdServer, type ListenAddress } from './nbd-server.js';
import type { NbdTls } from './nbd-tls.js';

/** An export as listed. */
export interface ExportInfo {
  name: string;
  /** The volume (or snapshot) served. */
  ref: string;
  /** As QEMU writes it: `nbd://127.0.0.1:10809/NAME`, `nbd+unix:///NAME?socket=PATH`. */
  uri: string;
  readOnly: boolean;
  /** The principal that started it. */
  owner: string;
  /** Clients connected now (known for the exports of this process only). */
  connections?: number;
  startedAt: string;
  /** The process serving it. */
  pid: number;
  /** The live job (a live copy) that watches its writes, if one does. */
  liveJob?: string;
  /** Only these TLS clients may open it (ExportOptions.clients). */
  clients?: string[];
}

/** A live job working within an export: stopping the export ends it first. */
export interface LiveJobOfExport {
  id: string;
  /** End the job cleanly (its source stays in use) and wait until it has. */
  cancel(): Promise<void>;
}

export interface ServeRequest {
  name: string;
  ref: string;
  device: BlockDevice;
  readOnly: boolean;
  owner: Principal;
  listen: ListenAddress;
  /** Run after the export is gone and its device closed (release locks). */
  release: () => void | Promise<void>;
  /** The id its locks are held under (a live job's locks are taken within it). */
  holder: string;
  /** TLS for this export's server in place of the broker's (`id`: the same credentials, the same id). */
  tls?: { creds: () => NbdTls; id: string };
  /** Only these TLS clients may open it (ExportOptions.clients). */
  clients?: readonly string[];
}

interface Served {
  info: Omit<ExportInfo, 'connections'>;
  owner: Principal;
  server: NbdServer;
  serverKey: string;
  device: BlockDevice;
  release: () => void | Promise<void>;
  stopping?: Promise<void>;
  ended: () => void;
  holder: string;
  live?: LiveJobOfExport;
  retargeted: ((ref: string) => void)[];
}

/** Where an export listens, as a key: servers are shared by address. */
function addressKey(a: ListenAddress): string | undefined {
  if ('socket' in a) return `unix:${a.socket}`;
  if (!a.port) return undefined; // port 0: a server of its own on a free port
  return `tcp:${a.host ?? '127.0.0.1'}:${a.port}`;
}

/** The exports of one broker (every principal's view shares it). */
export class ExportRegistry {
  private readonly served = new Map<string, Served>();
  private readonly reserved = new Set<string>();
  private readonly servers = new Map<string, NbdServer>();
  /** Which credentials each server requires (id '' none, 'config' the broker's): exports sharing a server must agree. */
  private readonly serverTls = new Map<string, { id: string; creds?: NbdTls }>();
  private readonly mutex = new KeyedMutex();
  private closing = false;

  /** True once closeAll() has begun. */
  get isClosing(): boolean {
    return this.closing;
  }

  /**
   * `tls`: every server of this broker requires it (the config's `nbd.tls`), loaded when the first
   * one starts; `loaded`: those credentials if they are loaded already (what reloadTls reads again).
   */
  constructor(private readonly tls?: () => NbdTls, private readonly loaded?: () => NbdTls | undefined) {}

  /** Refuse a name that is served or being started (AlreadyExists), and hold it for a start. */
  reserve(name: string): () => void {
    if (this.served.has(name) || this.reserved.has(name)) {
      throw new AlreadyExists(`an export named ${name} is already served`, { ref: name, hint: 'pick another name with --name, or stop that export' });
    }
    this.reserved.add(name);
    return () => this.reserved.delete(name);
  }

  /**
   * Serve a device (its name reserved first); the device and `release` are the registry's from now
   * on. `ended` resolves once the export has stopped, whoever stopped it.
   */
  async serve(r: ServeRequest): Promise<{ info: ExportInfo; ended: Promise<void> }> {
    if (this.closing) throw new FailedPrecondition('the broker is closing');
    const key = addressKey(r.listen);
    // Under the address's lock: a server is created, joined or closed by one caller at a time.
    return this.mutex.run([key ?? `new:${r.name}`], async () => {
      const tls = r.tls ?? (this.tls ? { creds: this.tls, id: 'config' } : undefined);
      let server = key ? this.servers.get(key) : undefined;
      if (server && (this.serverTls.get(keyOf(server))?.id ?? '') !== (tls?.id ?? '')) {
        throw new InvalidArgument(`${keyOf(server)} serves exports ${this.serverTls.get(keyOf(server))?.id ? 'with other TLS credentials' : 'without TLS'}: exports sharing an address share its TLS`, {
          ref: r.name, hint: 'listen on another port (--port) or socket for this export',
        });
      }
      if (!server) {
        const creds = tls?.creds();
        server = await NbdServer.listen(r.listen, creds ? { tls: creds } : {});
        this.servers.set(keyOf(server), server);
        this.serverTls.set(keyOf(server), { id: tls?.id ?? '', ...(creds ? { creds } : {}) });
      }
      try {
        server.addExport({ name: r.name, device: r.device, readOnly: r.readOnly, description: r.ref, ...(r.clients ? { clients: r.clients } : {}) });
      } catch (e) {
        if (server.exportNames().length === 0) {
          this.servers.delete(keyOf(server));
          this.serverTls.delete(keyOf(server));
          await server.close();
        }
        throw e;
      }
      const info = { name: r.name, ref: r.ref, uri: server.uri(r.name), readOnly: r.readOnly, owner: r.owner.id, startedAt: new Date().toISOString(), pid: process.pid, ...(r.clients ? { clients: [...r.clients] } : {}) };
      let ended!: () => void;
      const done = new Promise<void>((res) => { ended = res; });
      this.served.set(r.name, { info, owner: r.owner, server, serverKey: keyOf(server), device: r.device, release: r.release, ended, holder: r.holder, retargeted: [] });
      return { info: { ...info, connections: 0 }, ended: done };
    });
  }

  /** Exports served now. */
  list(): (ExportInfo & { ownerRole: Principal['role'] })[] {
    return [...this.served.values()].map((s) => ({
      ...s.info, connections: s.server.connectionCount(s.info.name), ownerRole: s.owner.role, ...(s.live ? { liveJob: s.live.id } : {}),
    }));
  }

  /** The device an export serves, and the id its locks are held under (for a live job of this broker); undefined once stopping. */
  device(name: string): { device: BlockDevice; holder: string; owner: Principal } | undefined {
    const s = this.served.get(name);
    return s && !s.stopping ? { device: s.device, holder: s.holder, owner: s.owner } : undefined;
  }

  /** Call `fn` with the new ref when the export is switched over to another volume. */
  onRetarget(name: string, fn: (ref: string) => void): void {
    this.served.get(name)?.retargeted.push(fn);
  }

  /** Mark an export as under a live job, or no longer (undefined): stopping it ends the job first. */
  setLive(name: string, live: LiveJobOfExport | undefined): void {
    const s = this.served.get(name);
    if (!s) throw new NotFound(`no export named ${name}`, { ref: name });
    if (live && s.live) throw new FailedPrecondition(`export ${name} is already under live job ${s.live.id}`, { ref: name });
    if (live) s.live = live;
    else delete s.live;
  }

  /**
   * The export now serves another volume (a live copy switched its device over): its ref, and what
   * releases its locks, change; the old release is returned for the caller to run.
   */
  retarget(name: string, to: { ref: string; holder: string; release: () => void | Promise<void> }): () => void | Promise<void> {
    const s = this.served.get(name);
    if (!s) throw new NotFound(`no export named ${name}`, { ref: name });
    const old = s.release;
    s.info = { ...s.info, ref: to.ref };
    s.release = to.release;
    s.holder = to.holder;
    for (const fn of s.retargeted) fn(to.ref);
    return old;
  }

  /** Admit only these TLS clients to an export from now on (NbdServer.setClients); its info as it is now. */
  setClients(name: string, clients: readonly string[]): ExportInfo & { ownerRole: Principal['role'] } {
    const s = this.served.get(name);
    if (!s || s.stopping) throw new NotFound(`no export named ${name}`, { ref: name });
    s.server.setClients(name, clients);
    s.info = { ...s.info, clients: [...clients] };
    return this.get(name)!;
  }

  get(name: string): (ExportInfo & { ownerRole: Principal['role'] }) | undefined {
    return this.list().find((e) => e.name === name);
  }

  /**
   * Stop an export: no new client gets it; its clients' requests in flight finish, then they are
   * disconnected; the device is flushed and closed, then its locks released. Stopping one that is
   * already stopping waits for that.
   */
  stop(name: string): Promise<void> {
    const s = this.served.get(name);
    if (!s) return Promise.reject(new NotFound(`no export named ${name}`, { ref: name, hint: 'list exports with `offload nbd list`' }));
    s.stopping ??= (async () => {
      // A live job within the export ends first, while its source is still served: cancelled, it leaves the source in use.
      await s.live?.cancel().catch(() => undefined);
      try {
        await s.server.removeExport(name);
        await s.device.flush().catch(() => undefined); // a device that cannot flush now: close still tries
        await s.device.close().catch(() => undefined);
      } finally {
        this.served.delete(name);
        await s.release();
        await this.closeIfIdle(s.serverKey);
        s.ended();
      }
    })();
    return s.stopping;
  }

  /**
   * Read every TLS credential loaded again — the config's, and each export's own — for the
   * handshakes from now on (connected clients stay). Each on its own: how many were read, and why
   * each of the others could not be (those serve on with what they had).
   */
  reloadTls(): { reloaded: number; failed: string[] } {
    const all = new Set<NbdTls>();
    const config = this.loaded?.();
    if (config) all.add(config);
    for (const t of this.serverTls.values()) if (t.creds) all.add(t.creds);
    let reloaded = 0;
    const failed: string[] = [];
    for (const creds of all) {
      try {
        creds.reload();
        reloaded++;
      } catch (e) {
        failed.push((e as Error).message);
      }
    }
    return { reloaded, failed };
  }

  /** Stop every export (the broker is closing). */
  async closeAll(): Promise<void> {
    this.closing = true;
    await Promise.allSettled([...this.served.keys()].map((n) => this.stop(n)));
    await Promise.allSettled([...this.servers.values()].map((s) => s.close()));
    this.servers.clear();
    this.serverTls.clear();
  }

  private async closeIfIdle(key: string): Promise<void> {
    await this.mutex.run([key], async () => {
      const server = this.servers.get(key);
      if (!server || server.exportNames().length > 0) return;
      this.servers.delete(key);
      this.serverTls.delete(key);
      await server.close();
    });
  }
}

function keyOf(s: NbdServer): string {
  const a = s.address;
  return 'socket' in a ? `unix:${a.socket}` : `tcp:${a.host}:${a.port}`;
}
