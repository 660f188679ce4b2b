/**
 * `offload serve`: the long-running broker and its control API (core/service/). It runs every job
 * it is asked to start, takes over orphaned ones (up to --max-jobs at a time), hosts NBD exports
 * for its clients, and serves the CLI's `--server`. The listening addresses are the first line of
 * stdout, once it is ready; SIGTERM or SIGINT stop it: no new requests, its jobs checkpointed and
 * released (another runner takes them at once), its exports stopped (they come back at its next
 * start), the socket removed, exit 0. SIGHUP reads the config file (its backends), the tokens
 * file, the HTTPS certificate and the NBD TLS credentials again, without a restart (which would
 * cut every export's clients).
 */
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { createSecureContext } from 'node:tls';
import type { Command } from 'commander';
import type { Logger } from '../../backend/plugin.js';
import type { Broker, Reconfigured } from '../../broker-api.js';
import type { BrokerConfig } from '../../config/config.js';
import type { JobEventHook } from '../../jobs/job-manager.js';
import { readCrls } from '../../export/crl.js';
import { createLogger } from '../../logger.js';
import type { ServiceTls } from '../../service/server.js';
import { UsageError, type CliContext } from '../contribution.js';

/** How `offload serve` opens its broker: the CLI's plugins and config, with the service's options. */
export type OpenServiceBroker = (o: {
  recoverJobs: boolean;
  adoptOrphans: { maxJobs: number };
  onJobEvent: JobEventHook;
  logger: Logger;
  suspendLiveCopies: boolean;
}) => Promise<{ broker: Broker; config: BrokerConfig; reconfigure: () => Promise<Reconfigured> }>;

interface ServeFlags { socket?: string; listen?: string; tokens?: string; maxJobs?: string; tlsCert?: string; tlsKey?: string; tlsClientCa?: string; tlsClientCrl?: string }

export function registerServeCommand(program: Command, ctx: CliContext, open: OpenServiceBroker): void {
  program.command('serve')
    .description('run the broker as a service: the control API on a unix socket (and TCP with tokens), its jobs, orphans taken over, hosted NBD exports')
    .option('--socket <path>', 'unix socket (default: the unix: path of server: in the config, else <state dir>/offload.sock); who may connect is the administrator')
    .option('--listen <host:port>', 'also serve on TCP (needs --tokens); port 0 picks a free one')
    .option('--tokens <file>', 'tokens file for TCP: tokens: [{ token, principal, role: admin | tenant }] (mode 600)')
    .option('--tls-cert <file>', 'serve TCP as HTTPS with this certificate (PEM; its chain after it), with --tls-key')
    .option('--tls-key <file>', "the certificate's private key (PEM)")
    .option('--tls-client-ca <file>', 'ask HTTPS clients for a certificate of this CA (PEM): one the tokens file names (certificate: COMMON-NAME, or DNS:…/URI:… of its alternative names) stands for its principal, without a token')
    .option('--tls-client-crl <file>', "the client CA's revocation list (PEM): a revoked certificate stands for no one (read again on SIGHUP)")
    .option('--max-jobs <n>', 'orphaned jobs to take over and run at a time (default 4)')
    .action(async (o: ServeFlags) => {
      const listen = o.listen === undefined ? undefined : parseListen(o.listen);
      if (listen && o.tokens === undefined) throw new UsageError('--listen needs --tokens FILE: every request over TCP must name its principal');
      const tls = tlsOf(o, listen !== undefined);
      const tcp = listen && { ...listen, ...(tls ? { tls } : {}) };
      const maxJobs = o.maxJobs === undefined ? 4 : Number(o.maxJobs);
      if (!Number.isInteger(maxJobs) || maxJobs < 1) throw new UsageError(`--max-jobs takes a whole number ≥ 1, got ${o.maxJobs}`);
      const logger = createLogger(process.env.OFFLOAD_LOG || 'warn');
      const [{ Tokens }, { ServiceMetrics }, { startService }] = await Promise.all([
        import('../../service/auth.js'), import('../../service/metrics.js'), import('../../service/server.js'),
      ]);
      // SIGHUP reads the credentials again: listened for from here on, as its default would end
      // the process; one that comes before the service is ready runs once it is.
      const hangUp = hangUps();
      process.on('SIGHUP', hangUp.signal);
      const tokens = o.tokens === undefined ? undefined : Tokens.load(o.tokens, logger);
      if (tokens?.namesCertificates && !tls?.clientCa) logger.warn('the tokens file names client certificates, which only --tls-client-ca asks for: those entries let no one in');
      const metrics = new ServiceMetrics();
      const { broker, config, reconfigure } = await open({ recoverJobs: true, adoptOrphans: { maxJobs }, onJobEvent: metrics.onJobEvent, logger, suspendLiveCopies: true });
      let service;
      try {
        const configured = config.server?.startsWith('unix:') ? resolve(config.baseDir, config.server.slice(5)) : undefined;
        const socket = resolve(o.socket ?? configured ?? join(config.state, 'offload.sock'));
        service = await startService({ broker, stateDir: config.state, socket, ...(tcp ? { tcp } : {}), ...(tokens ? { tokens } : {}), metrics, logger });
      } catch (e) {
        await broker.close();
        throw e;
      }
      const running = service;
      hangUp.ready(async () => {
        const done: string[] = [];
        type Kind = Parameters<typeof metrics.reloaded>[0];
        const failed = (kind: Kind, what: string, e: unknown) => {
          metrics.reloaded(kind, false);
          logger.error(`SIGHUP: ${what} not reloaded, the one in use stays: ${(e as Error).message}`);
        };
        const attempt = async (kind: Kind, what: string, fn: () => Promise<unknown>) => {
          try {
            await fn();
            metrics.reloaded(kind, true);
            done.push(what);
          } catch (e) {
            failed(kind, what, e);
          }
        };
        try {
          const r = await reconfigure(); // what could not be used is logged by the broker
          metrics.reloaded('config', r.failed.length === 0);
          done.push(`the config (${changes(r)})`);
        } catch (e) {
          failed('config', 'the config file', e);
        }
        if (o.tokens !== undefined) await attempt('tokens', 'the tokens file', () => running.reload({ tokens: Tokens.load(o.tokens!, logger) }));
        if (tls) await attempt('https', 'the HTTPS certificate', () => running.reload({ tls: tlsOf(o, true)! }));
        try {
          const nbd = await broker.exports.reloadTls();
          for (let i = 0; i < nbd.reloaded; i++) metrics.reloaded('nbd-tls', true);
          if (nbd.reloaded > 0) done.push(`the NBD TLS credentials (${nbd.reloaded})`);
          for (const why of nbd.failed) failed('nbd-tls', 'NBD TLS credentials', new Error(why));
        } catch (e) {
          failed('nbd-tls', 'the NBD TLS credentials', e);
        }
        ctx.note(`offload serve: SIGHUP: reloaded ${done.length > 0 ? done.join(', ') : 'nothing'}`);
      });
      // Listening for the signals before saying it is ready: one sent at once must stop it cleanly.
      const signalled = new Promise<string>((done) => {
        const stop = (sig: string) => {
          process.off('SIGINT', stop);
          process.off('SIGTERM', stop);
          hangUp.stop();
          done(sig);
        };
        process.on('SIGINT', stop);
        process.on('SIGTERM', stop);
      });
      const [socketAddress, httpAddress] = service.addresses;
      // --json: `http` or, with TLS, `https`.
      const tcpField = httpAddress ? { [httpAddress.startsWith('https:') ? 'https' : 'http']: httpAddress } : {};
      ctx.print({ socket: socketAddress, ...tcpField, pid: process.pid }, service.addresses.join(' '), { oneLine: true });
      ctx.note(`offload serve: ready (pid ${process.pid}); SIGTERM or Ctrl-C stops it`);
      const signal = await signalled;
      ctx.note(`offload serve: ${signal}: stopping`);
      await service.close();
      await broker.close(); // running jobs are checkpointed and released: another runner takes them at once
    });
}

/** What a reconfiguration changed, in a few words. */
function changes(r: Reconfigured): string {
  const said = [
    ...r.added.map((n) => `${n} added`), ...r.replaced.map((n) => `${n} replaced`), ...r.removed.map((n) => `${n} removed`),
    ...r.kept.map((k) => `${k.name} kept`), ...r.failed.map((f) => `${f.name} failed`), ...r.restartNeeded.map((k) => `${k} needs a restart`),
  ];
  return said.length > 0 ? said.join(', ') : 'no change';
}

/**
 * SIGHUPs while `offload serve` runs: each runs the reload once the service is ready (one that
 * came before runs then), one at a time; once it stops, none (the process must not end mid-stop).
 */
function hangUps(): { signal: () => void; ready(reload: () => Promise<void>): void; stop(): void } {
  let reload: (() => Promise<void>) | undefined;
  let pending = false;
  let stopped = false;
  let chain = Promise.resolve();
  const run = () => {
    chain = chain.then(() => (stopped ? undefined : reload!())).catch(() => undefined);
  };
  return {
    signal: () => {
      if (stopped) return;
      if (reload) run();
      else pending = true;
    },
    ready: (r) => {
      reload = r;
      if (pending) run();
    },
    stop: () => {
      stopped = true;
    },
  };
}

/** --tls-cert, --tls-key and --tls-client-ca, read and checked (a key that is not the certificate's is refused here). */
function tlsOf(o: ServeFlags, tcp: boolean): ServiceTls | undefined {
  if (o.tlsCert === undefined && o.tlsKey === undefined) {
    if (o.tlsClientCa !== undefined || o.tlsClientCrl !== undefined) throw new UsageError('--tls-client-ca and --tls-client-crl go with --tls-cert and --tls-key: client certificates are asked for over HTTPS');
    return undefined;
  }
  if (o.tlsCert === undefined || o.tlsKey === undefined) throw new UsageError('--tls-cert and --tls-key go together');
  if (!tcp) throw new UsageError('--tls-cert and --tls-key are for TCP (--listen): the unix socket is guarded by its file mode');
  const read = (flag: string, file: string): Buffer => {
    try {
      return readFileSync(file);
    } catch (e) {
      throw new UsageError(`${flag}: cannot read ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
    }
  };
  const clientCa = o.tlsClientCa === undefined ? undefined : read('--tls-client-ca', o.tlsClientCa);
  if (clientCa && !clientCa.includes('-----BEGIN CERTIFICATE-----')) throw new UsageError(`--tls-client-ca: ${o.tlsClientCa} holds no certificate (PEM)`);
  if (o.tlsClientCrl !== undefined && !clientCa) throw new UsageError('--tls-client-crl goes with --tls-client-ca: it revokes certificates of that CA');
  const clientCrl = o.tlsClientCrl === undefined ? undefined : read('--tls-client-crl', o.tlsClientCrl);
  if (clientCrl) {
    try {
      readCrls(clientCrl, `--tls-client-crl: ${o.tlsClientCrl}`); // as a reload will read it
    } catch (e) {
      throw new UsageError((e as Error).message);
    }
  }
  const tls = { cert: read('--tls-cert', o.tlsCert), key: read('--tls-key', o.tlsKey), ...(clientCa ? { clientCa } : {}), ...(clientCrl ? { clientCrl } : {}) };
  try {
    createSecureContext({ cert: tls.cert, key: tls.key, ...(clientCa ? { ca: clientCa } : {}), ...(clientCrl ? { crl: clientCrl } : {}) });
  } catch (e) {
    throw new UsageError(`--tls-cert/--tls-key${clientCa ? '/--tls-client-ca' : ''}${clientCrl ? '/--tls-client-crl' : ''} cannot be used: ${(e as Error).message}`);
  }
  return tls;
}

/** `HOST:PORT`, `[V6]:PORT` or `:PORT` (all addresses). */
function parseListen(text: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(text);
  if (!m || Number(m[3]) > 65535) throw new UsageError(`--listen takes HOST:PORT (port 0–65535), got ${JSON.stringify(text)}`);
  return { host: m[1] ?? (m[2] || '0.0.0.0'), port: Number(m[3]) };
}
