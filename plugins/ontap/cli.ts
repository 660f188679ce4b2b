/** `offload appliance ontap`: run the mock ONTAP appliance in the foreground. */
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { commandGroup, UsageError, type CliContext, type CliContribution } from '../../core/index.js';
import { MOCK_DEFAULTS, startOntapMock } from './appliance/server.js';
import type { FaultConfigInput } from './appliance/faults.js';

function int(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new UsageError(`${name} must be a non-negative integer, got "${v}"`);
    return n;
  };
}

export const ontapCli: CliContribution = {
  register(program: Command, ctx: CliContext): void {
    commandGroup(program, 'appliance', 'run a mock storage appliance (for tests and demos)')
      .command('ontap')
      .description('serve the ONTAP-style NAS mock appliance (REST API, async jobs, data plane, fault injector)')
      .option('--port <port>', `TCP port (0 = any free port)`, int('--port'), MOCK_DEFAULTS.port)
      .option('--host <host>', 'address to listen on', MOCK_DEFAULTS.host)
      .option('--state <dir>', 'keep volumes, snapshots and jobs in DIR (default: in memory)')
      .option('--username <user>', 'HTTP Basic user name', MOCK_DEFAULTS.username)
      .option('--password <password>', 'HTTP Basic password', MOCK_DEFAULTS.password)
      .option('--svm <names>', 'comma-separated SVM names', MOCK_DEFAULTS.svm)
      .option('--split-rate <bytesPerSecond>', 'clone split copy rate', int('--split-rate'), 64 * 1024 * 1024)
      .option('--job-expiry <ms>', 'how long finished jobs stay visible', int('--job-expiry'), 300_000)
      .option('--faults <file>', 'JSON fault config ({seed, rules}) to start with; see also POST /_admin/faults')
      .action(async (o: {
        port: number; host: string; state?: string; username: string; password: string; svm: string;
        splitRate: number; jobExpiry: number; faults?: string;
      }) => {
        let faults: FaultConfigInput | undefined;
        if (o.faults) {
          try {
            faults = JSON.parse(readFileSync(o.faults, 'utf8')) as FaultConfigInput;
          } catch (e) {
            throw new UsageError(`--faults ${o.faults}: ${e instanceof Error ? e.message : String(e)}`);
          }
        }
        const mock = await startOntapMock({
          port: o.port,
          host: o.host,
          stateDir: o.state ? resolve(o.state) : undefined,
          username: o.username,
          password: o.password,
          svms: o.svm.split(',').map((s) => s.trim()).filter(Boolean),
          splitBytesPerSecond: o.splitRate,
          jobExpiryMs: o.jobExpiry,
          faults,
        }).catch((e: unknown) => {
          if (e instanceof Error && e.name === 'ZodError') throw new UsageError(`--faults ${o.faults}: ${e.message}`);
          throw e;
        });
        ctx.print(
          { url: mock.url, username: mock.username, svms: mock.appliance.svms, state: o.state ?? null, splitBytesPerSecond: o.splitRate, jobExpiryMs: o.jobExpiry },
          [
            `ONTAP mock appliance listening on ${mock.url}`,
            `  auth:     HTTP Basic ${mock.username}:${mock.password}`,
            `  svms:     ${mock.appliance.svms.join(', ')}`,
            `  state:    ${o.state ? resolve(o.state) : 'in memory (lost on exit)'}`,
            `  split:    ${o.splitRate} bytes/s; finished jobs expire after ${o.jobExpiry} ms`,
            `  try:      curl -u ${mock.username}:${mock.password} ${mock.url}/api/storage/volumes`,
            '  Ctrl-C to stop.',
          ],
        );
        await new Promise<void>((done) => {
          const stop = () => {
            process.off('SIGINT', stop);
            process.off('SIGTERM', stop);
            void mock.close().then(done);
          };
          process.on('SIGINT', stop);
          process.on('SIGTERM', stop);
        });
      });
  },
};
