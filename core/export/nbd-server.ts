import { connect, createServer, type Server, type Socket } from 'node:net';
import { chmod, lstat, rm } from 'node:fs/promises';
import type { BlockDevice } from '../backend/block-device.js';
import { AlreadyExists, Busy, InvalidArgument, NotFound, type OffloadError } from '../model/errors.js';
import { Budget } from './budget.js';
import { BufferPool } from './buffer-pool.js';
import { ByteReader } from './byte-reader.js';
import { handshake, type ExportView, type Link } from './nbd-handshake.js';
import { CONTEXT_BITMAP_PREFIX, LIMITS } from './nbd-protocol.js';
import type { NbdTls } from './nbd-tls.js';
import { transmit } from './nbd-transmission.js';

/** Where a server listens: TCP (default 127.0.0.1:10809; port 0 picks a free one) or a unix socket. */
export type ListenAddress = { host?: string; port?: number } | { socket: string };

export interface NbdExportOptions {
  name: string;
  device: BlockDevice;
  readOnly: boolean;
  description?: string;
  /** Only these TLS clients may open it (ExportView.clients); the server must require TLS. */
  clients?: readonly string[];
}

/** A client in its transmission phase. */
interface Conn { socket: Socket; reader: ByteReader; done: Promise<void> }

interface Entry {
  view: ExportView;
  device: BlockDevice;
  connections: Set<Conn>;
}

/**
 * Payload bytes all connections of a server may hold at once: READ data from the device read
 * until the socket has written it, WRITE payloads from their reading until the device took them.
 * 16 MiB keeps `offload nbd` under 128 MiB of RSS while nbdcopy reads (a process at rest holds
 * ~70 MiB, and V8's young generation grows by ~27 MiB under any sustained load): with 64 MiB it
 * peaked at 138 MiB, and no faster. More would not buy parallelism either: the device's reads
 * run 4 at a time in libuv's thread pool, and 16 MiB is 64 requests of nbdcopy's 256 KiB.
 */
const BUDGET = 16 * 1024 * 1024;
/** A client that has not finished its handshake by then is dropped (qemu-nbd's default too). */
const HANDSHAKE_LIMIT_MS = 10_000;

export interface NbdServerOptions {
  /** Milliseconds a client has to finish the handshake (default 10 s). */
  handshakeLimitMs?: number;
  /** Require TLS with these credentials (STARTTLS before anything else, as qemu-nbd --tls-creds). */
  tls?: NbdTls;
}

/**
 * An NBD server over BlockDevices (fixed newstyle, structured replies, base:allocation,
 * qemu:allocation-depth and qemu:dirty-bitmap:NAME, several exports, TCP or a unix socket). It knows nothing of backends:
 * the broker's export registry gives it devices. See core/export/README.md.
 */
export class NbdServer {
  private readonly exports = new Map<string, Entry>();
  private readonly budget = new Budget(BUDGET);
  /** READ buffers, used again: as many bytes as the budget lets requests hold. */
  private readonly pool = new BufferPool(BUDGET);
  private closing = false;
  /** Clients still negotiating (not yet under an export): a close cuts them instead of waiting out the handshake limit. */
  private readonly negotiating = new Set<Socket>();

  private constructor(private readonly server: Server, readonly address: { host: string; port: number } | { socket: string },
    private readonly opts: NbdServerOptions) {}

  static async listen(addr: ListenAddress = {}, opts: NbdServerOptions = {}): Promise<NbdServer> {
    const server = createServer({ noDelay: true });
    let self: NbdServer | undefined;
    server.on('connection', (socket) => self?.accept(socket));
    const where = 'socket' in addr ? addr.socket : `${addr.host ?? '127.0.0.1'}:${addr.port ?? 10809}`;
    const start = (fn: (done: () => void) => void) => new Promise<void>((resolve, reject) => {
      server.once('error', (e: NodeJS.ErrnoException) => reject(listenError(e, where)));
      fn(resolve);
    });
    if ('socket' in addr) {
      await clearStaleSocket(addr.socket);
      await start((done) => server.listen(addr.socket, done));
      await chmod(addr.socket, 0o600);
      self = new NbdServer(server, { socket: addr.socket }, opts);
    } else {
      const host = addr.host ?? '127.0.0.1';
      const port = addr.port ?? 10809;
      if (!Number.isInteger(port) || port < 0 || port > 65535) throw new InvalidArgument(`a TCP port is 0–65535, got ${String(port)}`);
      await start((done) => server.listen(port, host, done));
      const a = server.address();
      self = new NbdServer(server, { host, port: typeof a === 'object' && a ? a.port : port }, opts);
    }
    return self;
  }

  /** Whether clients must start TLS. */
  get tls(): boolean {
    return this.opts.tls !== undefined;
  }

  /** The URI of an export as QEMU writes it; `nbds` when TLS is required (the NBD URI spec, doc/uri.md). */
  uri(name: string): string {
    const a = this.address;
    const path = uriPath(name);
    const scheme = this.opts.tls ? 'nbds' : 'nbd';
    if ('socket' in a) return `${scheme}+unix:///${path}?socket=${a.socket}`;
    const host = a.host.includes(':') ? `[${a.host}]` : a.host;
    return `${scheme}://${host}:${a.port}/${path}`;
  }

  addExport(opts: NbdExportOptions): void {
    if (typeof opts.name !== 'string' || opts.name.length === 0 || Buffer.byteLength(opts.name) > LIMITS.maxString) {
      throw new InvalidArgument(`an export name is 1–${LIMITS.maxString} bytes, got ${JSON.stringify(opts.name)}`);
    }
    if (this.exports.has(opts.name)) throw new AlreadyExists(`an export named ${opts.name} is already served here`, { ref: opts.name });
    if (opts.clients !== undefined) this.assertNamesClients(opts.name);
    const device = opts.device;
    const bs = device.blockSize ?? 0;
    const preferred = bs >= 512 && bs <= LIMITS.maxPayload && (bs & (bs - 1)) === 0 ? bs : 4096;
    this.exports.set(opts.name, {
      device,
      connections: new Set(),
      view: {
        name: opts.name, readOnly: opts.readOnly, preferredBlockSize: Math.max(preferred, 4096),
        hasDepth: typeof device.allocationDepth === 'function', fastZero: typeof device.writeZeroes === 'function',
        size: () => device.sizeBytes, bitmaps: () => exportedBitmaps(device),
        ...(opts.description !== undefined ? { description: opts.description } : {}),
        ...(opts.clients !== undefined ? { clients: new Set(opts.clients) } : {}),
      },
    });
  }

  /**
   * Admit only these TLS clients to an export from now on (undefined: every client TLS lets in).
   * Connected clients stay; one still negotiating meets the new list at its next option (the
   * handshake looks the export up for each).
   */
  setClients(name: string, clients: readonly string[] | undefined): void {
    const e = this.exports.get(name);
    if (!e) throw new NotFound(`no export named ${name} is served here`, { ref: name });
    if (clients !== undefined) this.assertNamesClients(name);
    const { clients: _, ...view } = e.view;
    e.view = clients !== undefined ? { ...view, clients: new Set(clients) } : view;
  }

  private assertNamesClients(name: string): void {
    if (!this.opts.tls) {
      throw new InvalidArgument(`export ${name}: clients are told apart by TLS, which this server does not require`, { ref: name, hint: 'configure nbd.tls (or give the export TLS credentials)' });
    }
    if (!this.opts.tls.namesClients) {
      throw new InvalidArgument(`export ${name}: clients are named by their certificates, which this server's TLS (verifyPeer: false) does not ask for`, { ref: name, hint: 'leave verifyPeer on, or use PSK identities' });
    }
  }

  /** The names served now. */
  exportNames(): string[] {
    return [...this.exports.keys()];
  }

  /** Clients connected to an export now. */
  connectionCount(name: string): number {
    return this.exports.get(name)?.connections.size ?? 0;
  }

  /**
   * Stop serving an export: no new connection gets it; its connections stop reading, finish what
   * they were sent, and close. Resolves when they are gone (the device is the caller's to close).
   */
  async removeExport(name: string): Promise<void> {
    const e = this.exports.get(name);
    if (!e) throw new NotFound(`no export named ${name} is served here`, { ref: name });
    this.exports.delete(name);
    await this.drain(e);
  }

  /** Stop listening, and drain every connection. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    for (const s of this.negotiating) s.destroy();
    const all = [...this.exports.values()];
    this.exports.clear();
    await Promise.all(all.map((e) => this.drain(e)));
    await closed;
    if ('socket' in this.address) await rm(this.address.socket, { force: true });
  }

  /** An export by name (the default export, `nbd://host:port`, is the handshake's to pick: the only one its client may open). */
  private lookup(name: string): Entry | undefined {
    return this.exports.get(name);
  }

  private async drain(e: Entry): Promise<void> {
    for (const c of e.connections) c.reader.stop();
    await Promise.all([...e.connections].map((c) => c.done));
  }

  private accept(socket: Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    socket.on('error', () => undefined); // a client that vanished: its reads end the connection
    // STARTTLS replaces both with the TLS socket over this one.
    const link: Link = { socket, reader: new ByteReader(socket) };
    this.negotiating.add(socket);
    void (async () => {
      try {
        const limit = setTimeout(() => socket.destroy(), this.opts.handshakeLimitMs ?? HANDSHAKE_LIMIT_MS);
        const session = await handshake(link, {
          lookup: (name) => this.lookup(name)?.view,
          list: () => [...this.exports.values()].map((x) => x.view),
          ...(this.opts.tls ? { tls: this.opts.tls } : {}),
        }).finally(() => {
          clearTimeout(limit);
          this.negotiating.delete(socket);
        });
        const { socket: s, reader } = link;
        if (!session) {
          s.end();
          return;
        }
        const entry = this.lookup(session.export.name);
        if (entry?.view !== session.export) {
          socket.destroy(); // removed (or replaced) while this client negotiated
          return;
        }
        let finished!: () => void;
        const conn: Conn = { socket: s, reader, done: new Promise<void>((r) => { finished = r; }) };
        entry.connections.add(conn);
        try {
          await transmit(s, reader, session, entry.device, this.budget, this.pool);
          s.end();
        } finally {
          entry.connections.delete(conn);
          finished();
        }
      } catch (e) {
        if (process.env.OFFLOAD_NBD_DEBUG) console.error('nbd connection dropped:', e);
        // A protocol violation, or the client went away mid-handshake: drop it; others go on.
        socket.destroy();
      }
    })();
  }
}

/**
 * The dirty bitmaps of a device an export offers, in the device's order: each name once, none
 * empty, with a NUL, or too long for its context name (4096 bytes); none at all when the device
 * cannot tell which ranges are dirty, or cannot list its bitmaps now (the client then sees none).
 */
function exportedBitmaps(device: BlockDevice): string[] {
  if (typeof device.dirtyBitmaps !== 'function' || typeof device.dirtyExtents !== 'function') return [];
  let names: unknown;
  try {
    names = device.dirtyBitmaps();
  } catch (e) {
    if (process.env.OFFLOAD_NBD_DEBUG) console.error('nbd: the device could not list its dirty bitmaps:', e);
    return [];
  }
  if (!Array.isArray(names)) return [];
  const out: string[] = [];
  for (const n of names) {
    if (typeof n !== 'string' || n.length === 0 || n.includes('\0') || out.includes(n)) continue;
    if (Buffer.byteLength(CONTEXT_BITMAP_PREFIX + n, 'utf8') > LIMITS.maxString) continue;
    out.push(n);
  }
  return out;
}

/** Why a server could not listen, as a typed error. */
function listenError(e: NodeJS.ErrnoException, where: string): OffloadError {
  if (e.code === 'EADDRINUSE') return new Busy(`${where} is already in use`, { ref: where, hint: 'pick another port (--port 0 picks a free one) or socket path' });
  if (e.code === 'EACCES' || e.code === 'EPERM') return new InvalidArgument(`not allowed to listen on ${where}: ${e.message}`, { ref: where, hint: 'ports below 1024 need privileges' });
  return new InvalidArgument(`cannot listen on ${where}: ${e.message}`, { ref: where });
}

/**
 * Remove a socket file left by a server that is gone, as qemu-nbd does; refuse a path that is not
 * a socket (never delete a user's file) or one a live server still answers on.
 */
async function clearStaleSocket(path: string): Promise<void> {
  const st = await lstat(path).catch(() => undefined);
  if (!st) return;
  if (!st.isSocket()) throw new InvalidArgument(`${path} exists and is not a socket`, { ref: path, hint: 'give a path that does not exist yet' });
  const live = await new Promise<boolean>((resolve) => {
    const c = connect(path);
    c.once('connect', () => { c.destroy(); resolve(true); });
    c.once('error', () => resolve(false));
  });
  if (live) throw new Busy(`a server is already listening on ${path}`, { ref: path, hint: 'pick another socket path' });
  await rm(path, { force: true });
}

/** A name as a URI path: RFC 3986 path characters (and '/') as they are, every other byte %-escaped. */
function uriPath(name: string): string {
  let out = '';
  for (const b of Buffer.from(name, 'utf8')) {
    const c = String.fromCharCode(b);
    out += /[A-Za-z0-9\-._~!$&'()*+,;=:@/]/.test(c) ? c : `%${b.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}
