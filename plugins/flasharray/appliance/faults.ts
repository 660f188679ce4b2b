/**
 * The mock array's fault rules: the appliance kit's one grammar (plugins/appliance-kit/README.md)
 * plus what only this array does — revoking sessions, refusing a continuation token, and the
 * gateway's X-RateLimit-* headers on an injected 429.
 */
import { z } from 'zod';
import { defineFaultGrammar } from '../../appliance-kit/index.js';

export const faultGrammar = defineFaultGrammar({
  statusFields: {
    /** For 429: send the X-RateLimit-* headers (a real gateway does; fragile clients crash without them). */
    rateLimitHeaders: z.boolean().default(true),
    /** For 429 with headers: the minute budget is spent too (a client should wait for the next minute). */
    minuteSpent: z.boolean().default(false),
  },
  actions: [
    /** Revoke every session before handling: the request (and any other in flight) gets 401. */
    z.strictObject({ type: z.literal('revoke-token') }),
    /** Refuse the request's continuation token with 400 (its rule sees only requests that carry one). */
    z.strictObject({ type: z.literal('bad-continuation-token') }),
  ],
  sees: (action, url) => action.type !== 'bad-continuation-token' || url.searchParams.has('continuation_token'),
});

export type FaultAction = z.output<typeof faultGrammar.Action>;
export type FaultRuleInput = z.input<typeof faultGrammar.Rule>;
export type FaultConfigInput = z.input<typeof faultGrammar.FaultConfig>;
