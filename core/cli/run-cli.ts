import type { ContainerModule } from 'inversify';
import type { LoadedPlugins } from '../backend/plugin-container.js';
import type { CliContribution } from './contribution.js';
import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { ConfigError } from '../config/config-error.js';
import { secrets } from '../config/secrets.js';
import { configFileOf, runCommandLine } from './command-line.js';
import type { OutputStreams } from './output.js';
import { registerBrokerCommands } from './commands/index.js';

export interface RunCliOptions {
  /** Plugin modules: their CLI contributions are added, and the broker (when a command opens one) uses them. */
  plugins: readonly ContainerModule[];
  /**
   * Contributions given directly, without loading plugin modules: bin/main.ts starts `offload img`
   * this way, so a qemu-img–style call does not pay for inversify, the config schemas and SQLite.
   */
  contributions?: readonly CliContribution[];
  io?: OutputStreams;
  env?: NodeJS.ProcessEnv;
  /**
   * Exit code for bad usage (default 2). `offload img` uses 1, as qemu-img does: there 2 means
   * "corruptions found" to a script that runs `img check`.
   */
  usageExitCode?: number;
}

/**
 * Run the command line — the broker verbs (`backends`, `volume`, `jobs`, …) and the plugins'
 * commands — and return the exit code: 0 success, 1 the operation failed, 2 bad usage (including
 * a broken config; see usageExitCode). Errors are one line, without a stack trace.
 */
export async function runCli(argv: string[], opts: RunCliOptions): Promise<number> {
  const env = opts.env ?? process.env;
  // The plugins are loaded once: their commands are registered, and a broker a command opens uses them.
  let loaded: LoadedPlugins | undefined;
  return runCommandLine(argv, {
    io: opts.io,
    env,
    usageExitCode: opts.usageExitCode,
    openBroker: async (file, server) => {
      const address = server ?? await configuredServer(file, env);
      if (address !== undefined) {
        // A client of the service: no plugin or backend here, every verb is a request.
        const { connectBroker } = await import('../service/client.js');
        if (env.OFFLOAD_TOKEN) secrets.add(env.OFFLOAD_TOKEN);
        const https = address.startsWith('https:');
        return connectBroker(address, {
          ...(env.OFFLOAD_TOKEN ? { token: env.OFFLOAD_TOKEN } : {}), ...(https && env.OFFLOAD_CA ? { ca: readCa(env.OFFLOAD_CA) } : {}), ...(https ? await clientCertificate(env) : {}),
        });
      }
      const { createBroker } = await import('../broker.js');
      // A command never adopts another runner's job (it would run it only while the command
      // lives): `offload jobs resume ID` takes one over explicitly.
      return createBroker(file, { plugins: loaded ?? opts.plugins, env, recoverJobs: false });
    },
    register: async (program, ctx) => {
      registerBrokerCommands(program, ctx, async (o) => {
        // `offload serve` is the service: it opens the broker itself, whatever server: says.
        const [{ createBroker }, { loadConfig }, { loadPlugins }] = await Promise.all([
          import('../broker.js'), import('../config/config.js'), import('../backend/plugin-container.js'),
        ]);
        const plugins = loaded ?? await loadPlugins(opts.plugins);
        const file = configFileOf(program, env);
        const config = loadConfig(file, plugins.factories, env);
        const broker = await createBroker(config, { plugins, env, ...o });
        return { broker, config, reconfigure: () => broker.reconfigure(file, { env }) };
      });
      const contributions = [...(opts.contributions ?? [])];
      if (opts.plugins.length > 0) {
        const { loadPlugins } = await import('../backend/plugin-container.js');
        loaded = await loadPlugins(opts.plugins);
        contributions.push(...loaded.contributions);
      }
      for (const c of contributions) c.register(program, ctx);
    },
  });
}

/** $OFFLOAD_CA: the CA certificates (PEM) a client trusts for an https:// service. */
function readCa(file: string): Buffer {
  const hint = 'OFFLOAD_CA names a PEM file of the CA certificates to trust';
  let pem: Buffer;
  try {
    pem = readFileSync(file);
  } catch (e) {
    throw new ConfigError(`OFFLOAD_CA: cannot read ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, hint);
  }
  if (!pem.includes('-----BEGIN CERTIFICATE-----')) throw new ConfigError(`OFFLOAD_CA: ${file} holds no certificate (PEM)`, hint);
  return pem;
}

/** $OFFLOAD_CERT and $OFFLOAD_KEY: this client's certificate and key (PEM), for a service that asks for one. */
async function clientCertificate(env: NodeJS.ProcessEnv): Promise<{ cert?: Buffer; key?: Buffer }> {
  if (!env.OFFLOAD_CERT && !env.OFFLOAD_KEY) return {};
  const hint = 'OFFLOAD_CERT and OFFLOAD_KEY name the PEM files of this client\'s certificate and its key';
  if (!env.OFFLOAD_CERT || !env.OFFLOAD_KEY) throw new ConfigError('OFFLOAD_CERT and OFFLOAD_KEY go together', hint);
  const read = (name: string, file: string): Buffer => {
    try {
      return readFileSync(file);
    } catch (e) {
      throw new ConfigError(`${name}: cannot read ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, hint);
    }
  };
  const out = { cert: read('OFFLOAD_CERT', env.OFFLOAD_CERT), key: read('OFFLOAD_KEY', env.OFFLOAD_KEY) };
  const { createSecureContext } = await import('node:tls'); // only here: the CLI's start-up stays as it was
  try {
    createSecureContext(out);
  } catch (e) {
    throw new ConfigError(`OFFLOAD_CERT/OFFLOAD_KEY cannot be used: ${(e as Error).message}`, hint);
  }
  return out;
}

/** The `server:` of a config file (a service to send the commands to), if it names one. */
async function configuredServer(file: string, env: NodeJS.ProcessEnv): Promise<string | undefined> {
  if (!existsSync(file)) return undefined; // opening the broker says what is missing
  const { readConfigFile, substituteEnv } = await import('../config/config.js');
  const { raw, baseDir } = readConfigFile(file);
  const server = (raw as { server?: unknown } | null)?.server;
  if (server === undefined) return undefined;
  if (typeof server !== 'string') throw new ConfigError('server: expected unix:PATH, http://HOST:PORT or https://HOST:PORT');
  return socketFromConfig(substituteEnv(server, env, 'server') as string, baseDir);
}

/** A relative `unix:` path in a config file is relative to the file, as its other paths are. */
function socketFromConfig(server: string, baseDir: string): string {
  return server.startsWith('unix:') ? `unix:${resolve(baseDir, server.slice(5))}` : server;
}
