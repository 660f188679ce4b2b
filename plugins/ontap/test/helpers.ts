import { OntapBackend } from '../backend.js';
import { OntapConfig } from '../config.js';

/** A backend with small poll and retry delays, for tests. */
export function makeBackend(endpoint: string, extra: Record<string, unknown> = {}, creds = { username: 'admin', password: 'netapp123' }): OntapBackend {
  return new OntapBackend(
    OntapConfig.parse({
      name: 'nas1', kind: 'ontap', endpoint, ...creds, svm: 'svm0',
      pollIntervalMs: 2, pollMaxIntervalMs: 10, pollBudgetMs: 5_000,
      retry: { maxAttempts: 3, baseDelayMs: 1, maxDelayMs: 20, requestTimeoutMs: 5_000 },
      ...extra,
    }),
  );
}

export async function failure(p: Promise<unknown>): Promise<{ code: string; message: string; data?: Record<string, unknown>; hint?: string }> {
  try {
    await p;
  } catch (e) {
    return e as { code: string; message: string };
  }
  throw new Error('expected a failure');
}
