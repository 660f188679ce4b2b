/**
 * The control API server (`offload serve`): one broker, served by Fastify from the route table on
 * a unix socket (whoever may connect to it is the administrator: the socket is mode 0600 in the
 * state directory) and optionally on TCP, where every request needs a bearer token from the tokens
 * file. A request runs as its principal's view of the broker (`broker.as`): a tenant sees its own
 * volumes, jobs and exports only, and another's are NotFound, as if absent.
 */
import { existsSync, chmodSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import type { Server as TlsServer, TLSSocket } from 'node:tls';
import { ClientCertificates, httpsOptions, type ServiceTls } from './client-certs.js';
export type { ServiceTls } from './client-certs.js';
import Fastify, { type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import type { Logger } from '../backend/plugin.js';
import type { Broker } from '../broker-api.js';
import { ADMIN, tenant, type Principal } from '../locks/principal.js';
import { BackendUnavailable, Busy, InvalidArgument, isOffloadError, NotFound, OffloadError, PermissionDenied, toOffloadError } from '../model/errors.js';
import type { Tokens } from './auth.js';
import { HostedExports } from './hosted-exports.js';
import { errorBody, invalidRequest, statusOf } from './http-errors.js';
import type { ServiceMetrics } from './metrics.js';
import { openApiDocument } from './openapi.js';
import { AS_HEADER } from './remote.js';
import { ROUTES, type Route } from './routes.js';

export const API_VERSION = '1.0.0';

export interface ServiceOptions {
  broker: Broker;
  /** The broker's state directory: the hosted exports are kept there. */
  stateDir: string;
  /** The unix socket to serve on (its connections are the administrator). */
  socket: string;
  /**
   * Also serve on TCP (needs `tokens`); port 0 picks a free one; with `tls` (PEM certificate and
   * key), HTTPS — and with `tls.clientCa`, client certificates of that CA stand for the principals
   * the tokens file names by `certificate`.
   */
  tcp?: { host: string; port: number; tls?: ServiceTls };
  tokens?: Tokens;
  metrics: ServiceMetrics;
  logger: Logger;
}

export interface Service {
  /** Where it listens: `unix:PATH`, then `http://HOST:PORT` (`https://` with TLS) when TCP is on; each usable as `--server`. */
  readonly addresses: string[];
  /**
   * From the next request on (`offload serve` on SIGHUP): `tokens`, a tokens file read again
   * (a token added, one taken away; a principal's NBD clients narrowed, its hosted exports with
   * them); `tls`, the TCP listener's renewed certificate and key (for handshakes after;
   * connections made stay).
   */
  reload(o: { tokens?: Tokens; tls?: ServiceTls }): Promise<void>;
  /** Stop accepting, answer pending long polls, wait for requests in flight. The broker stays open (its owner closes it). */
  close(): Promise<void>;
}

/** The tokens in use, replaced whole when the file is read again. */
interface Auth { tokens: Tokens | undefined }

/** How a listener learns who is asking. */
type Authenticate = (req: FastifyRequest) => Principal | undefined;

export async function startService(o: ServiceOptions): Promise<Service> {
  if (o.tcp && !o.tokens) throw new InvalidArgument('serving on TCP needs a tokens file (--tokens FILE): every request there must name its principal');
  const hosted = new HostedExports(o.stateDir, o.logger);
  const stopping = new AbortController();
  const auth: Auth = { tokens: o.tokens };
  o.metrics.readJobsFrom(() => o.broker.jobs.list());
  await hosted.restore(o.broker, (p) => auth.tokens?.bound(p) ?? p);

  const apps: FastifyInstance[] = [];
  // Every connection, from its first byte (a TLS handshake, a request not sent yet).
  const sockets = new Set<Socket>();
  const close = async () => {
    hosted.shutdown();
    stopping.abort();
    // Idle connections are closed at once and requests in flight answered; a client that keeps
    // a connection open without a request (or stalls its TLS handshake) would hold the close.
    const cut = setTimeout(() => { for (const s of sockets) s.destroy(); }, CLOSE_GRACE_MS);
    await Promise.allSettled(apps.map((a) => a.close()));
    clearTimeout(cut);
    rmSync(o.socket, { force: true });
  };
  const track = (app: FastifyInstance): FastifyInstance => {
    app.server.on('connection', (s: Socket) => {
      sockets.add(s);
      s.once('close', () => sockets.delete(s));
    });
    return app;
  };
  try {
    await freeSocketPath(o.socket);
    const local = buildApp(o, auth, hosted, stopping.signal, () => ADMIN, track(Fastify(FASTIFY)));
    apps.push(local);
    await local.listen({ path: o.socket });
    chmodSync(o.socket, 0o600);
    const addresses = [`unix:${o.socket}`];
    let secure: ((tls: ServiceTls) => void) | undefined;
    if (o.tcp) {
      const tls = o.tcp.tls;
      // An HTTPS instance has its own server type; the routes and hooks are the same.
      const app = tls ? Fastify({ ...FASTIFY, https: httpsOptions(tls) }) as unknown as FastifyInstance : Fastify(FASTIFY);
      const certs = tls && new ClientCertificates(app.server as unknown as TlsServer, tls.clientCa, tls.clientCrl);
      // A bearer token, when one is sent, decides; without one, a client certificate the CA signed.
      const authenticate: Authenticate = (req) => req.headers.authorization !== undefined || !tls?.clientCa
        ? auth.tokens!.principalOf(req.headers.authorization)
        : auth.tokens!.principalOfCertificate(certs!.namesOf(req.raw.socket as TLSSocket));
      // Why a certificate the file names let no one in, when it is the entry that expired.
      const refusal = (req: FastifyRequest) => (req.headers.authorization === undefined && tls?.clientCa && auth.tokens!.certificateExpired(certs!.namesOf(req.raw.socket as TLSSocket))
        ? "the client certificate's entry in the tokens file has expired" : undefined);
      const remote = buildApp(o, auth, hosted, stopping.signal, authenticate, track(app), refusal);
      apps.push(remote);
      if (certs) secure = (t) => certs.renew(t);
      await remote.listen({ host: o.tcp.host, port: o.tcp.port });
      const addr = remote.server.address();
      const port = typeof addr === 'object' && addr ? addr.port : o.tcp.port;
      addresses.push(`${tls ? 'https' : 'http'}://${o.tcp.host.includes(':') ? `[${o.tcp.host}]` : o.tcp.host}:${port}`);
    }
    const reload = async (r: { tokens?: Tokens; tls?: ServiceTls }) => {
      if (r.tls) {
        if (!secure) throw new InvalidArgument('this service serves no HTTPS: there is no certificate to renew');
        secure(r.tls);
      }
      if (r.tokens) {
        if (!auth.tokens) throw new InvalidArgument('this service was started without a tokens file');
        auth.tokens = r.tokens;
        await hosted.rebind(o.broker, (p) => r.tokens!.bound(p));
      }
    };
    return { addresses, reload, close };
  } catch (e) {
    await close();
    throw toOffloadError(e, 'starting the service');
  }
}

/** A socket file left by a service that died is removed; one a live service answers on is Busy. */
async function freeSocketPath(path: string): Promise<void> {
  if (!existsSync(path)) return;
  const live = await new Promise<boolean>((done) => {
    const s = connect(path);
    s.once('connect', () => { s.destroy(); done(true); });
    s.once('error', () => done(false));
  });
  if (live) throw new Busy(`a service already listens on ${path}`, { ref: path, hint: 'stop it first, or pass another --socket' });
  rmSync(path, { force: true });
}

/** How long a stopping service waits for its connections before it cuts them. */
const CLOSE_GRACE_MS = 5_000;

/** Requests that arrive while the service stops are answered by the onRequest hook, in our format. */
const FASTIFY = { logger: false, forceCloseConnections: 'idle', return503OnClosing: false } as const;

function buildApp(o: ServiceOptions, auth: Auth, hosted: HostedExports, stopping: AbortSignal, authenticate: Authenticate, app: FastifyInstance,
  refusal?: (req: FastifyRequest) => string | undefined): FastifyInstance {
  const principals = new WeakMap<FastifyRequest, Principal>();

  app.setErrorHandler((err: FastifyError | OffloadError, _req, reply) => sendError(reply, fromFastify(err)));
  app.setNotFoundHandler((req, reply) => sendError(reply, new NotFound(`no route ${req.method} ${req.url.split('?')[0]}`, { hint: 'see /openapi.json' })));

  // Hooks in callback style: an async hook costs every request a promise and its ticks.
  app.addHook('onRequest', (req, reply, done) => {
    if (stopping.aborted) {
      return reply.code(503).header('connection', 'close').send(errorBody(new BackendUnavailable('the service is stopping', { hint: 'try again once it has started again' })));
    }
    if (req.url === '/openapi.json') return done(); // the description of the API is public
    const who = authenticate(req);
    if (!who) {
      const header = req.headers.authorization;
      const needed = `a bearer token is needed (Authorization: Bearer TOKEN)${o.tcp?.tls?.clientCa ? ', or a client certificate the tokens file names' : ''}`;
      const err = new PermissionDenied(refusal?.(req) ?? (!header ? needed : auth.tokens?.expired(header) ? 'the bearer token has expired' : 'the bearer token is not known'), {
        hint: 'pass the token in OFFLOAD_TOKEN, as the tokens file of `offload serve` names it',
      });
      return reply.code(401).header('www-authenticate', 'Bearer').send(errorBody(err));
    }
    try {
      principals.set(req, actingAs(who, req.headers[AS_HEADER], auth.tokens));
    } catch (e) {
      return done(e as Error);
    }
    done();
  });
  app.addHook('onResponse', (req, reply, done) => {
    o.metrics.observe(req.method, req.routeOptions.url ?? 'unknown', reply.statusCode, reply.elapsedTime / 1000);
    done();
  });

  app.get('/openapi.json', async () => openApiDocument(API_VERSION));
  app.get('/metrics', async (req, reply) => {
    if (principals.get(req)!.role !== 'admin') throw new PermissionDenied('metrics are for administrators');
    return reply.type(o.metrics.contentType).send(await o.metrics.text());
  });

  for (const r of Object.values(ROUTES) as Route[]) {
    app.route({
      method: r.method, url: r.path,
      handler: async (req, reply) => {
        const params = r.params.safeParse(req.params, { reportInput: true });
        if (!params.success) throw invalidRequest('path', params.error);
        const query = r.query.safeParse(req.query, { reportInput: true });
        if (!query.success) throw invalidRequest('query', query.error);
        const body = r.body.safeParse(req.body, { reportInput: true });
        if (!body.success) throw invalidRequest('body', body.error);
        const broker = o.broker.as(principals.get(req)!);
        // The request's signal is made only for a call that asks for it (a long poll).
        let signal: AbortSignal | undefined;
        const ctx = { exports: hosted, get signal() { return (signal ??= requestSignal(reply, stopping)); } };
        const result = await r.call(broker, { params: params.data, query: query.data, body: body.data }, ctx);
        return r.response === null ? reply.code(204).send() : reply.send(result);
      },
    });
  }
  return app;
}

/** `Offload-As: TENANT`: an administrator acting as that tenant (bound as the tokens file binds it); a tenant may name only itself. */
function actingAs(who: Principal, header: string | string[] | undefined, tokens: Tokens | undefined): Principal {
  if (header === undefined) return who;
  const id = Array.isArray(header) ? header[0]! : header;
  if (who.role === 'admin') return tokens ? tokens.bound(tenant(id)) : tenant(id);
  if (id === who.id) return who;
  throw new PermissionDenied(`tenant ${who.id} cannot act as ${id}`);
}

/** Aborted when the client goes away before its answer, or the service stops. */
function requestSignal(reply: FastifyReply, stopping: AbortSignal): AbortSignal {
  const ac = new AbortController();
  const abort = () => ac.abort();
  stopping.addEventListener('abort', abort, { once: true });
  reply.raw.once('close', () => {
    stopping.removeEventListener('abort', abort);
    if (!reply.raw.writableEnded) abort();
  });
  return ac.signal;
}

function sendError(reply: FastifyReply, err: OffloadError): FastifyReply {
  return reply.code(statusOf(err)).send(errorBody(err));
}

/** Fastify's own errors (bad JSON, an unknown content type, a body too large) are bad requests. */
function fromFastify(err: FastifyError | OffloadError): OffloadError {
  if (isOffloadError(err)) return err;
  const status = (err as FastifyError).statusCode;
  if (status !== undefined && status >= 400 && status < 500) return new InvalidArgument(`invalid request: ${err.message}`, { hint: 'send JSON (Content-Type: application/json); see /openapi.json' });
  return toOffloadError(err);
}
