/**
 * The mock appliance's fault rules: the appliance kit's one grammar
 * (plugins/appliance-kit/README.md) plus what only ONTAP does — jobs that fail, hang or vanish,
 * and on `status` a Retry-After header and an ONTAP error code and message.
 */
import { z } from 'zod';
import { defineFaultGrammar } from '../../appliance-kit/index.js';

export const faultGrammar = defineFaultGrammar({
  statusFields: {
    /** Seconds, sent as `Retry-After`. */
    retryAfter: z.number().nonnegative().optional(),
    /** The ONTAP error code of the body (default: the status). */
    code: z.string().optional(),
    message: z.string().optional(),
  },
  actions: [
    /** The job this mutation creates fails with `{code, message}` after `afterPolls` job GETs; nothing changes. */
    z.strictObject({
      type: z.literal('job-failure'),
      afterPolls: z.number().int().nonnegative().default(1),
      code: z.string().default('13001'),
      message: z.string().default('injected failure'),
    }),
    /** The job this mutation creates stays `running` until cancelled; nothing changes. */
    z.strictObject({ type: z.literal('job-stuck') }),
    /** The job vanishes as if it had expired: its GET answers 404 (the work itself still happens). */
    z.strictObject({ type: z.literal('job-expired') }),
  ],
});

export type FaultAction = z.output<typeof faultGrammar.Action>;
export type FaultRuleInput = z.input<typeof faultGrammar.Rule>;
export type FaultConfigInput = z.input<typeof faultGrammar.FaultConfig>;
