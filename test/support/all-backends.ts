/**
 * One broker over every built-in backend with a data path, on loopback: the local qcow2 pool, the
 * FlashArray mock (san1) and the ONTAP mock (nas1), plus whatever a test adds. For tests that
 * run the same case on each.
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ContainerModule } from 'inversify';
import { afterAll, beforeAll } from 'vitest';
import { createBroker, type BlockDevice, type Broker, type RawConfig } from '../../core/index.js';
import { startFlashArrayMock } from '../../plugins/flasharray/index.js';
import { builtinPlugins } from '../../plugins/index.js';
import { MOCK_DEFAULTS, startOntapMock } from '../../plugins/ontap/index.js';

export interface AllBackends {
  broker: Broker;
  /** The mocks, for tests that inject faults (`san.faults.add(…)`). */
  san: Awaited<ReturnType<typeof startFlashArrayMock>>;
  nas: Awaited<ReturnType<typeof startOntapMock>>;
  /** The broker's state folder (the pool is `pool/` in it). */
  state: string;
  /** The broker's config: another broker made from it shares the state and the backends (another process, as far as locks go). */
  config: RawConfig;
  close(): Promise<void>;
}

export async function startAllBackends(o: { extra?: (state: string) => Record<string, unknown>[]; plugins?: ContainerModule[]; prefix?: string } = {}): Promise<AllBackends> {
  const san = await startFlashArrayMock({ port: 0 });
  const nas = await startOntapMock({ port: 0, jobDurationMs: 20 });
  const state = mkdtempSync(join(tmpdir(), o.prefix ?? 'offload-all-'));
  mkdirSync(join(state, 'pool'));
  const config = {
    state,
    backends: [
      { name: 'local', kind: 'qcow2', path: join(state, 'pool') },
      { name: 'san1', kind: 'flasharray', endpoint: san.url, apiToken: san.apiToken },
      {
        name: 'nas1', kind: 'ontap', endpoint: nas.url, username: nas.username, password: nas.password, svm: MOCK_DEFAULTS.svm,
        pollIntervalMs: 5, pollMaxIntervalMs: 40,
      },
      ...(o.extra?.(state) ?? []),
    ] as never,
  } satisfies RawConfig;
  const broker = await createBroker(config, { plugins: [...builtinPlugins, ...(o.plugins ?? [])] });
  return {
    broker,
    config,
    san,
    nas,
    state,
    async close() {
      await broker.close();
      await Promise.allSettled([san.close(), nas.close()]);
      rmSync(state, { recursive: true, force: true });
    },
  };
}

/** Run `fn` on a volume's data path, closing it afterwards. */
export async function withDevice<T>(broker: Broker, ref: string, mode: 'r' | 'rw', fn: (d: BlockDevice) => Promise<T>): Promise<T> {
  const dev = await broker.volumes.open(ref, mode);
  try {
    return await fn(dev);
  } finally {
    await dev.close();
  }
}

/** startAllBackends for one test file: started before its tests (handed to `use`), closed after them. */
export function allBackendsForFile(prefix: string, use: (all: AllBackends) => void): void {
  let all: AllBackends | undefined;
  beforeAll(async () => {
    all = await startAllBackends({ prefix });
    use(all);
  });
  afterAll(async () => {
    await all?.close();
  });
}

/** Test data that depends on the seed and on the offset it is written at, never a zero byte. */
export function patternBytes(seed: number, offset: number, length: number): Uint8Array {
  return Uint8Array.from({ length }, (_, i) => ((seed * 131 + (offset + i) * 7) % 251) + 1);
}
