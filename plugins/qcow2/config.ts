/** The config entry of a `qcow2` backend (the local pool), validated at the plugin boundary. */
import { z } from 'zod';
import { isValidName } from '../../core/index.js';

export const Qcow2PoolConfig = z.strictObject({
  name: z.string().refine(isValidName, { message: 'a backend name is 1–128 characters of A-Z a-z 0-9 . _ - not starting with . or -' }),
  kind: z.literal('qcow2'),
  /** The pool folder (relative paths resolve against the config file's folder). It must exist and be writable. */
  path: z.string().min(1, 'path must name the pool folder'),
  /** Format of new volumes: qcow2 (snapshots, linked clones, stream, commit) or raw (volumes and full copies only). */
  format: z.enum(['qcow2', 'raw']).default('qcow2'),
  /** qcow2 cluster size of new volumes: a power of two from 512 bytes to 2 MiB. */
  clusterSize: z.number().int().refine((n) => n >= 512 && n <= 2 * 1024 * 1024 && (n & (n - 1)) === 0, {
    message: 'clusterSize must be a power of two from 512 to 2097152',
  }).default(65536),
  /** Follow backing references that leave the pool folder (off: such a chain is PermissionDenied). */
  allowBackingOutsidePool: z.boolean().default(false),
});
export type Qcow2PoolConfig = z.infer<typeof Qcow2PoolConfig>;
export type Qcow2PoolConfigInput = z.input<typeof Qcow2PoolConfig>;
