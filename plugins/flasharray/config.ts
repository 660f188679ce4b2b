/** The config entry of a `flasharray` backend, validated at the plugin boundary. */
import { z } from 'zod';
import { isValidName } from '../../core/index.js';

export const RetryPolicy = z.strictObject({
  /** Tries per request, the first included (429, 5xx, resets, timeouts, malformed answers). */
  maxAttempts: z.number().int().min(1).max(50).default(5),
  /** First backoff delay; doubles per try, with jitter, up to `maxDelayMs`. */
  baseDelayMs: z.number().int().nonnegative().default(200),
  maxDelayMs: z.number().int().nonnegative().default(10_000),
  /** Longest wait a 429 may impose (its headers can ask for up to a minute). */
  maxRateLimitWaitMs: z.number().int().nonnegative().default(60_000),
});
export type RetryPolicy = z.infer<typeof RetryPolicy>;

export const FlashArrayConfig = z.strictObject({
  name: z.string().refine(isValidName, { message: 'a backend name is 1–128 characters of A-Z a-z 0-9 . _ - not starting with . or -' }),
  kind: z.literal('flasharray'),
  /** Management endpoint of the array, e.g. https://array1.example.com or http://127.0.0.1:8081 */
  endpoint: z.url({ protocol: /^https?$/, message: 'endpoint must be an http:// or https:// URL' }),
  /** Long-lived API token; exchanged at `/login` for a session token (secret). */
  apiToken: z.string().min(1, 'apiToken must not be empty'),
  /** REST version used in paths (`/api/<apiVersion>/…`). */
  apiVersion: z.string().regex(/^2\.\d+$/, 'apiVersion looks like 2.26').default('2.26'),
  /** Per-request timeout (each try). */
  timeoutMs: z.number().int().positive().default(30_000),
  retry: RetryPolicy.default(RetryPolicy.parse({})),
});
export type FlashArrayConfig = z.infer<typeof FlashArrayConfig>;
export type FlashArrayConfigInput = z.input<typeof FlashArrayConfig>;

export const SECRET_FIELDS = ['apiToken'] as const;
