import type { BackendEnvironment, Logger } from '../../../core/index.js';
import type { FlashArrayBackend } from '../backend.js';
import { FlashArrayConfig, type FlashArrayConfigInput } from '../config.js';
import { flasharrayFactory } from '../factory.js';

export const quietLogger: Logger = { debug() {}, info() {}, warn() {}, error() {} };

export const testEnv: BackendEnvironment = { stateDir: '/tmp', baseDir: '/tmp', logger: quietLogger };

/** Small delays so retry tests stay fast. */
export const fastRetry = { maxAttempts: 4, baseDelayMs: 1, maxDelayMs: 5, maxRateLimitWaitMs: 20 };

export async function makeBackend(endpoint: string, apiToken: string, extra: Partial<FlashArrayConfigInput> = {}): Promise<FlashArrayBackend> {
  const config = FlashArrayConfig.parse({ name: 'san', kind: 'flasharray', endpoint, apiToken, retry: fastRetry, ...extra });
  return (await flasharrayFactory.create(config, testEnv)) as FlashArrayBackend;
}

export function pattern(size: number, seed: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return b;
}

/** One request to the mock over HTTP: REST paths are relative to /api/2.26, data-plane paths start with a slash. */
export function callMock(url: string, token: string, method: string, path: string, body?: Uint8Array | object, headers: Record<string, string> = {}): Promise<Response> {
  const target = path.startsWith('/') ? `${url}${path}` : `${url}/api/2.26/${path}`;
  const init: RequestInit = { method, headers: { 'x-auth-token': token, ...headers } };
  if (body instanceof Uint8Array) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    (init.headers as Record<string, string>)['content-type'] = 'application/json';
  }
  return fetch(target, init);
}
