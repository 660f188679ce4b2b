import type { Command } from 'commander';
import type { ExportOptions } from '../../broker-api.js';
import { serviceOf } from '../../service/remote.js';
import { UsageError, type CliContext } from '../contribution.js';

interface NbdFlags { name?: string; readOnly?: boolean; port?: string; socket?: string; bind?: string; tls?: string; tlsAllow?: string; clients?: string }

/**
 * `offload nbd REF`: serve a volume over NBD in the foreground, like qemu-nbd. The URI is the
 * first line of stdout (a script reads it, then starts its client); SIGINT or SIGTERM stops the
 * export — clients' requests in flight finish, the volume is flushed — and the command exits 0.
 * With a service (--server) the service hosts the export: the command prints the URI and returns.
 */
export function registerNbdCommand(program: Command, ctx: CliContext): void {
  const nbd = program.command('nbd')
    .description('serve a volume (or, read-only, a snapshot) over NBD until interrupted, like qemu-nbd (with --server: hosted by the service until `nbd stop`); `nbd list`, `nbd stop NAME`')
    .argument('<ref>', 'the volume (backend/volume) or snapshot (backend/volume@snapshot) to serve')
    .option('--name <name>', 'export name in the URI (default: the ref)')
    .option('--read-only', 'serve read-only (a shared lock: others may read the volume meanwhile)')
    .option('--port <port>', 'TCP port (default 10809; 0 picks a free one)')
    .option('--socket <path>', 'listen on a unix socket instead of TCP')
    .option('--bind <addr>', 'address to listen on (default 127.0.0.1)')
    .option('--tls <creds>', 'require TLS, as qemu-nbd --tls-creds: x509:FOLDER (ca-cert.pem, server-cert.pem, server-key.pem, ca-crl.pem; clients need a certificate of the CA) or psk:FILE (psktool\'s identity:hexkey lines)')
    .option('--tls-allow <names>', 'with x509: only clients whose certificate names one of these (comma-separated common names, or DNS:…/URI:… subject alternative names), as QEMU\'s tls-authz')
    .option('--clients <names>', 'only these TLS clients may open this export (comma-separated certificate common names, DNS:…/URI:… subject alternative names, or PSK identities); to others it does not exist. Needs TLS (--tls, or nbd.tls in the config, or the service\'s)')
    .action(async (ref: string, o: NbdFlags) => {
      const tls = tlsOf(o);
      const clients = namesOf(o.clients, '--clients');
      const opts: ExportOptions = {
        ...(o.name !== undefined ? { name: o.name } : {}), ...(o.readOnly ? { readOnly: true } : {}), listen: listenOf(o), ...(tls ? { tls } : {}), ...(clients ? { clients } : {}),
      };
      const broker = await ctx.broker();
      if (tls && serviceOf(broker)) throw new UsageError('--tls is for an export this command serves: a service\'s exports use the nbd.tls of its config');
      const exp = await broker.exports.start(ref, opts);
      ctx.print({ name: exp.name, ref: exp.ref, uri: exp.uri, readOnly: exp.readOnly }, exp.uri, { oneLine: true });
      const service = serviceOf(broker);
      if (service) {
        // The service hosts it: it goes on after this command, and after a restart of the service.
        ctx.note(`the service at ${service} serves ${exp.ref}${exp.readOnly ? ' read-only' : ''} as ${exp.name}; \`offload nbd stop ${exp.name}\` stops it`);
        return;
      }
      ctx.note(`serving ${exp.ref}${exp.readOnly ? ' read-only' : ''} as ${exp.name}; Ctrl-C to stop`);
      let signalled = false;
      await new Promise<void>((done) => {
        const stop = () => {
          signalled = true;
          process.off('SIGINT', stop);
          process.off('SIGTERM', stop);
          void exp.stop().finally(done);
        };
        process.on('SIGINT', stop);
        process.on('SIGTERM', stop);
        void exp.stopped.then(() => {
          process.off('SIGINT', stop);
          process.off('SIGTERM', stop);
          done();
        });
      });
      if (!signalled) {
        // Stopped from elsewhere: an administrator's request on the volume preempted it.
        ctx.note(`export ${exp.name} was stopped by another request on ${exp.ref}`);
        ctx.setExitCode(1);
      }
    });

  nbd.command('list')
    .description('exports served now (by any offload process sharing this state)')
    .action(async () => {
      const all = await (await ctx.broker()).exports.list();
      if (ctx.json) return ctx.print(all);
      ctx.table(all.map((e) => ({ ...e, mode: e.readOnly ? 'read-only' : 'read-write', clients: e.clients?.join(',') ?? '', live: e.liveJob ?? '' })), ['name', 'ref', 'mode', 'uri', 'owner', 'clients', 'pid', 'live']);
    });

  nbd.command('clients <name> [names]')
    .description('change which TLS clients an export admits from now on (comma-separated certificate common names, DNS:…/URI:… names, or PSK identities); connected ones stay')
    .option('--none', 'admit no new client')
    .action(async (name: string, names: string | undefined, o: { none?: boolean }) => {
      if (o.none && names !== undefined) throw new UsageError('give NAMES or --none, not both');
      const clients = o.none ? [] : namesOf(names ?? '', 'NAMES');
      const broker = await ctx.broker();
      // An export this command could change lives in this process only: a service's, or a program's.
      if (!serviceOf(broker)) throw new UsageError('nbd clients changes an export of the service: pass --server (a foreground `offload nbd` takes --clients when it starts)');
      const info = await broker.exports.setClients(name, clients!);
      ctx.print(info, `export ${name} admits ${clients!.length > 0 ? clients!.join(', ') : 'no new client'}`);
    });

  nbd.command('stop <name>')
    .description('stop an export: its clients are disconnected after their requests in flight, the volume flushed')
    .option('--force', 'stop one under a live copy: the copy is cancelled first (its source stays current)')
    .action(async (name: string, o: { force?: boolean }) => {
      await (await ctx.broker()).exports.stop(name, o.force ? { force: true } : {});
      ctx.print({ stopped: name }, `stopped export ${name}`);
    });
}

function listenOf(o: NbdFlags): ExportOptions['listen'] {
  if (o.socket !== undefined) {
    if (o.port !== undefined || o.bind !== undefined) throw new UsageError('--socket cannot be combined with --port or --bind');
    return { socket: o.socket };
  }
  let port = 10809;
  if (o.port !== undefined) {
    if (!/^\d+$/.test(o.port) || Number(o.port) > 65535) throw new UsageError(`--port takes 0–65535, got ${o.port}`);
    port = Number(o.port);
  }
  return { host: o.bind ?? '127.0.0.1', port };
}

/** A comma-separated list of names (undefined: the option was not given). */
function namesOf(text: string | undefined, option: string): string[] | undefined {
  if (text === undefined) return undefined;
  const names = text.split(',').map((n) => n.trim()).filter((n) => n.length > 0);
  if (names.length === 0) throw new UsageError(`${option} takes one or more names, comma-separated`);
  return names;
}

/** `--tls x509:FOLDER | psk:FILE` and `--tls-allow NAMES`. */
function tlsOf(o: NbdFlags): ExportOptions['tls'] {
  if (o.tls === undefined) {
    if (o.tlsAllow !== undefined) throw new UsageError('--tls-allow goes with --tls x509:FOLDER');
    return undefined;
  }
  const m = /^(x509|psk):(.+)$/.exec(o.tls);
  if (!m) throw new UsageError(`--tls takes x509:FOLDER or psk:FILE, got ${o.tls}`);
  if (m[1] === 'psk') {
    if (o.tlsAllow !== undefined) throw new UsageError('--tls-allow names certificates: it goes with --tls x509:FOLDER');
    return { psk: m[2]! };
  }
  const allow = namesOf(o.tlsAllow, '--tls-allow');
  return { x509: m[2]!, ...(allow ? { allow } : {}) };
}
