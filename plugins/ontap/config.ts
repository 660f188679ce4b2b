/** The `ontap` backend's config entry, validated at the module boundary. */
import { z } from 'zod';

const NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;

export const RetryPolicy = z
  .object({
    /** Attempts per request (the first included) on 429/503/5xx, resets, timeouts and non-JSON answers. */
    maxAttempts: z.number().int().min(1).max(20).default(5),
    /** First backoff delay; doubles per attempt, with jitter, up to `maxDelayMs`. */
    baseDelayMs: z.number().int().nonnegative().default(250),
    maxDelayMs: z.number().int().nonnegative().default(10_000),
    /** A request without an answer after this long is abandoned and retried. */
    requestTimeoutMs: z.number().int().positive().default(30_000),
  })
  .strict();
export type RetryPolicy = z.infer<typeof RetryPolicy>;

export const OntapConfig = z
  .object({
    name: z.string().regex(NAME, 'a backend name: 1–128 characters of A-Z a-z 0-9 . _ -, not starting with . or -'),
    kind: z.literal('ontap'),
    endpoint: z.url({ protocol: /^https?$/, error: 'an http(s) URL such as http://127.0.0.1:8082' }),
    username: z.string().min(1),
    password: z.string().min(1),
    svm: z.string().min(1),
    /** First delay between job polls; grows ×1.5 (with jitter) up to `pollMaxIntervalMs`. */
    pollIntervalMs: z.number().int().positive().default(500),
    pollMaxIntervalMs: z.number().int().positive().default(5_000),
    /** How long to wait for an ordinary appliance job before giving up with Timeout. */
    pollBudgetMs: z.number().int().positive().default(120_000),
    retry: RetryPolicy.prefault({}),
  })
  .strict();
export type OntapConfig = z.infer<typeof OntapConfig>;

export const SECRET_FIELDS = ['password'] as const;
