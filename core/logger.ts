import type { Logger } from './backend/plugin.js';
import { secrets } from './config/secrets.js';

/** Logs one JSON line per event to stderr when OFFLOAD_LOG is set (debug|info|warn|error); secrets redacted. */
const LEVELS = ['debug', 'info', 'warn', 'error'] as const;

export function createLogger(level = process.env.OFFLOAD_LOG ?? ''): Logger {
  const min = LEVELS.indexOf(level as (typeof LEVELS)[number]);
  const log = (l: (typeof LEVELS)[number]) => (msg: string, data?: Record<string, unknown>) => {
    if (min < 0 || LEVELS.indexOf(l) < min) return;
    process.stderr.write(`${secrets.redact(JSON.stringify({ time: new Date().toISOString(), level: l, msg, ...data }))}\n`);
  };
  return { debug: log('debug'), info: log('info'), warn: log('warn'), error: log('error') };
}

export const silentLogger: Logger = { debug() {}, info() {}, warn() {}, error() {} };
