/**
 * What the live jobs' crash tests share: `offload serve` over a local pool and a FlashArray mock
 * (the mock lives in the test process, so it outlives every kill of the service), a client of it,
 * and reading a whole export over NBD.
 */
import { appendFileSync, rmSync } from 'node:fs';
import { afterAll, beforeAll } from 'vitest';
import { startFlashArrayMock } from '../../plugins/flasharray/index.js';
import { offload, serve, setup, type Result, type ServiceChild, type Setup } from '../service/service-helpers.js';
import { CMD, openExport, readData, reply, request } from './nbd-client.js';

/** The whole export (`size` bytes), read over NBD in 4 MiB requests. */
export async function readExport(port: number, name: string, size: number): Promise<Buffer> {
  const c = await openExport(port, name);
  const out = Buffer.alloc(size);
  const step = 4 * 1024 * 1024;
  for (let off = 0; off < size; off += step) {
    const len = Math.min(step, size - off);
    request(c.wire, CMD.READ, off, len);
    const r = await reply(c.wire, len);
    if (r.error !== 0) throw new Error(`read at ${off}: NBD error ${r.error}`);
    readData(r, off, len).copy(out, off);
  }
  request(c.wire, CMD.DISC, 0, 0);
  c.wire.socket.end();
  return out;
}

export interface LiveService {
  s: Setup;
  service: ServiceChild;
  /** The CLI as a client of the service running now. */
  client(...args: string[]): Promise<Result>;
  /** The same with --json, parsed; throws on a non-zero exit. */
  json(...args: string[]): Promise<unknown>;
  /** SIGKILL the service. */
  kill(): Promise<void>;
  /** SIGTERM the service (a clean stop): its exit code. */
  stop(): Promise<number | null>;
  /** Start it again (its state folder as it was), with `env` if given (else as before). */
  restart(env?: NodeJS.ProcessEnv): Promise<void>;
  close(): Promise<void>;
}

/**
 * `offload serve` with backends `local` (qcow2 pool) and `san1` (a FlashArray mock in this
 * process); `env`: the service's environment (OFFLOAD_RUNNER_HOST: another host, or this one in
 * another boot).
 */
export async function startLiveService(o: { leaseSeconds?: number; env?: NodeJS.ProcessEnv } = {}): Promise<LiveService> {
  const san = await startFlashArrayMock({ port: 0 });
  const s = setup(o.leaseSeconds !== undefined ? { leaseSeconds: o.leaseSeconds } : {});
  let env = o.env ?? {};
  appendFileSync(s.config, ['', '  - name: san1', '    kind: flasharray', `    endpoint: ${san.url}`, `    apiToken: ${san.apiToken}`, ''].join('\n'));
  const ls: LiveService = {
    s,
    service: await serve(s, [], env),
    client: (...args) => offload(s, ['--server', ls.service.addresses[0]!, ...args]),
    json: async (...args) => {
      const r = await ls.client('--json', ...args);
      if (r.code !== 0) throw new Error(`offload ${args.join(' ')} exited ${r.code}: ${r.err}`);
      return JSON.parse(r.out) as unknown;
    },
    kill: async () => {
      ls.service.child.kill('SIGKILL');
      await ls.service.exit;
    },
    stop: () => ls.service.stop(),
    restart: async (next) => {
      env = next ?? env;
      ls.service = await serve(s, [], env);
    },
    close: async () => {
      if (ls.service.child.exitCode === null) await ls.service.stop();
      await san.close();
      rmSync(s.dir, { recursive: true, force: true });
    },
  };
  return ls;
}

/** startLiveService for one describe block: started before its tests (handed to `use`), closed after them. */
export function liveServiceForSuite(use: (ls: LiveService) => void, o: Parameters<typeof startLiveService>[0] = {}): void {
  let ls: LiveService | undefined;
  beforeAll(async () => {
    ls = await startLiveService(o);
    use(ls);
  });
  afterAll(async () => {
    await ls?.close();
  });
}
