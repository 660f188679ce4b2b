/**
 * The client's side of the wire: calls a route of the table (routes.ts) on a service at
 * `unix:PATH` or `http://HOST:PORT`, and turns every error answer back into the typed error the
 * broker threw there (http-errors.ts).
 */
import { Agent, request, type ClientRequest, type IncomingHttpHeaders, type IncomingMessage, type RequestOptions } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import type { z } from 'zod';
import { BackendUnavailable, errorFromCode, InvalidArgument } from '../model/errors.js';
import { errorFromBody } from './http-errors.js';
import type { Route } from './routes.js';

export type ServerAddress = { socketPath: string; text: string } | { host: string; port: number; tls: boolean; text: string };

/** `unix:PATH`, `http://HOST:PORT` or `https://HOST:PORT` (as `--server`, OFFLOAD_SERVER and `server:` take it). */
export function parseServerAddress(text: string): ServerAddress {
  if (text.startsWith('unix:') && text.length > 5) return { socketPath: text.slice(5), text };
  let url: URL | undefined;
  try {
    url = new URL(text);
  } catch {
    url = undefined;
  }
  if (!url || (url.protocol !== 'http:' && url.protocol !== 'https:') || (url.pathname !== '/' && url.pathname !== '') || url.search || url.username) {
    throw new InvalidArgument(`invalid service address ${JSON.stringify(text)}: expected unix:PATH, http://HOST:PORT or https://HOST:PORT`);
  }
  const tls = url.protocol === 'https:';
  return { host: url.hostname.replace(/^\[(.*)\]$/, '$1'), port: Number(url.port || (tls ? 443 : 80)), tls, text };
}

/** How the transport reaches a service over HTTPS: the CAs to trust (PEM) instead of the system's; a client certificate and its key. */
export interface TransportTls { ca?: string | Buffer; cert?: string | Buffer; key?: string | Buffer }

/** One keep-alive pool for an address: plain HTTP (a unix socket or TCP), or HTTPS. */
function agentFor(address: ServerAddress, tls: TransportTls): Agent {
  if ('socketPath' in address || !address.tls) return new Agent({ keepAlive: true });
  return new HttpsAgent({ keepAlive: true, ...(tls.ca !== undefined ? { ca: tls.ca } : {}), ...(tls.cert !== undefined ? { cert: tls.cert, key: tls.key } : {}) });
}

type Input<P extends z.ZodType, Q extends z.ZodType, B extends z.ZodType> = { params?: z.input<P>; query?: z.input<Q>; body?: z.input<B> };

export class HttpTransport {
  private readonly send1: (o: RequestOptions, cb: (res: IncomingMessage) => void) => ClientRequest;

  constructor(
    readonly address: ServerAddress,
    private readonly headers: Record<string, string> = {},
    tls: TransportTls = {},
    private readonly agent: Agent = agentFor(address, tls),
  ) {
    this.send1 = 'tls' in address && address.tls ? httpsRequest : request;
  }

  /** The same service, with more headers on every request (a token, the principal to act as); one connection pool. */
  with(headers: Record<string, string>): HttpTransport {
    return new HttpTransport(this.address, { ...this.headers, ...headers }, {}, this.agent);
  }

  async call<P extends z.ZodType, Q extends z.ZodType, B extends z.ZodType, R extends z.ZodType | null>(
    route: Route<P, Q, B, R>, input: Input<P, Q, B>,
  ): Promise<R extends z.ZodType ? z.output<R> : void> {
    const params = (input.params ?? {}) as Record<string, string>;
    let path = route.path.replace(/:(\w+)/g, (_, k: string) => encodeURIComponent(params[k] ?? ''));
    const query = Object.entries((input.query ?? {}) as Record<string, unknown>).filter(([, v]) => v !== undefined);
    if (query.length > 0) path += `?${new URLSearchParams(query.map(([k, v]): [string, string] => [k, String(v)])).toString()}`;
    const { status, body } = await this.send(route.method, path, input.body);
    if (status < 200 || status > 299) throw errorFromBody(status, body);
    if (route.response === null) return undefined as never;
    const checked = route.response.safeParse(body);
    if (!checked.success) {
      throw errorFromCode('Internal', `the service's answer to ${route.method} ${route.path} is not what this client expects: ${checked.error.issues[0]?.message ?? ''}`, {
        hint: 'the service and this client may be of different versions',
      });
    }
    return body as never; // as it came: fields this client does not know pass through
  }

  /** One request; the body as parsed JSON (text when it is not JSON). */
  send(method: string, path: string, body?: unknown): Promise<{ status: number; headers: IncomingHttpHeaders; body: unknown }> {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const where = 'socketPath' in this.address ? { socketPath: this.address.socketPath } : { host: this.address.host, port: this.address.port };
    return new Promise((resolve, reject) => {
      const req = this.send1({
        ...where, method, path, agent: this.agent,
        headers: { ...this.headers, accept: 'application/json', ...(payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {}) },
      }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('error', (e) => reject(this.unreachable(e)));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let parsed: unknown = text;
          if ((res.headers['content-type'] ?? '').includes('json') && text.length > 0) {
            try {
              parsed = JSON.parse(text);
            } catch {
              parsed = text;
            }
          }
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body: parsed });
        });
      });
      req.on('error', (e) => reject(this.unreachable(e)));
      req.end(payload);
    });
  }

  close(): void {
    this.agent.destroy();
  }

  private unreachable(e: Error): BackendUnavailable {
    const code = (e as NodeJS.ErrnoException).code ?? '';
    // node's codes for a certificate this client does not trust, or one for another name; and
    // for an answer that is not TLS (a plain-HTTP service at an https:// address).
    const untrusted = /CERT|SELF_SIGNED|UNABLE_TO_(GET|VERIFY)|ALTNAME/.test(code);
    const plain = code === 'ERR_SSL_WRONG_VERSION_NUMBER' || code === 'EPROTO';
    return new BackendUnavailable(`cannot reach the service at ${this.address.text}: ${e.message}`, {
      hint: untrusted
        ? "the service's certificate is not trusted here: give its CA in OFFLOAD_CA=FILE (PEM), and reach it by a name the certificate holds"
        : plain
          ? 'the service does not answer with TLS: use http:// for a service without --tls-cert'
          : 'start it with `offload serve`, or check --server / OFFLOAD_SERVER / server: in the config (https:// for a service with --tls-cert)',
    });
  }
}
