/** `offload appliance flasharray`: run the mock array on this machine until interrupted. */
import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { commandGroup, UsageError, type CliContext, type CliContribution } from '../../core/index.js';
import type { Command } from 'commander';
import { startFlashArrayMock } from './appliance/index.js';

interface Options {
  port: string;
  host: string;
  state?: string;
  apiToken?: string;
  sessionTtl?: string;
  faults?: string;
}

export const flasharrayCli: CliContribution = {
  register(program: Command, ctx: CliContext): void {
    commandGroup(program, 'appliance', 'run a mock storage appliance on this machine')
      .command('flasharray')
      .description('serve a FlashArray-style REST 2.x API (plus an HTTP data plane and a fault injector) until interrupted')
      .option('--port <port>', 'TCP port to listen on (0 = any free port)', '8081')
      .option('--host <host>', 'address to listen on', '127.0.0.1')
      .option('--state <dir>', 'keep volumes and data in this folder across restarts (default: in memory)')
      .option('--api-token <token>', 'the API token POST /login accepts (default: generated and printed)')
      .option('--session-ttl <ms>', 'idle time after which a session token gets 401', String(30 * 60 * 1000))
      .option('--faults <file>', 'JSON fault config ({seed, rules}) to start with; see also POST /_admin/faults')
      .action(async (opts: Options) => {
        const port = Number(opts.port);
        if (!Number.isInteger(port) || port < 0 || port > 65535) throw new UsageError(`--port must be 0–65535, got "${opts.port}"`);
        const sessionTtlMs = Number(opts.sessionTtl);
        if (!Number.isInteger(sessionTtlMs) || sessionTtlMs <= 0) throw new UsageError(`--session-ttl must be a positive number of milliseconds, got "${opts.sessionTtl}"`);
        let faults: unknown;
        if (opts.faults) {
          try {
            faults = JSON.parse(await readFile(opts.faults, 'utf8'));
          } catch (e) {
            throw new UsageError(`--faults ${opts.faults}: ${(e as Error).message}`);
          }
        }
        let mock;
        try {
          mock = await startFlashArrayMock({
            port, host: opts.host, stateDir: opts.state ? resolve(opts.state) : undefined, apiToken: opts.apiToken, sessionTtlMs,
            faults: faults as never,
          });
        } catch (e) {
          const err = e as NodeJS.ErrnoException;
          if (err.code === 'EADDRINUSE') throw new UsageError(`port ${port} on ${opts.host} is already in use; pick another with --port`);
          if (err.code === 'EADDRNOTAVAIL' || err.code === 'ENOTFOUND') throw new UsageError(`--host ${opts.host}: not an address of this machine`);
          if (opts.state && ['EACCES', 'ENOTDIR', 'EROFS', 'EEXIST'].includes(err.code ?? '')) throw new UsageError(`--state ${opts.state}: ${err.message}`);
          if (err.name === 'ZodError') throw new UsageError(`--faults ${opts.faults}: not a valid fault config (${err.message})`);
          throw e;
        }
        ctx.print({ url: mock.url, apiToken: mock.apiToken, state: opts.state ? resolve(opts.state) : null }, [
          `FlashArray mock listening on ${mock.url}`,
          `api token: ${mock.apiToken}${opts.apiToken ? '' : ' (generated)'}`,
          `state: ${opts.state ? resolve(opts.state) : 'in memory (lost on exit)'}`,
          `try: curl -si -X POST -H 'api-token: ${mock.apiToken}' ${mock.url}/api/2.26/login`,
        ]);
        await new Promise<void>((done) => {
          const stop = () => { process.off('SIGINT', stop); process.off('SIGTERM', stop); done(); };
          process.on('SIGINT', stop);
          process.on('SIGTERM', stop);
        });
        await mock.close();
      });
  },
};
