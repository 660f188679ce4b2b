import { InvalidArgument } from '../model/errors.js';

/** A config that cannot be used: the message names the path of the bad field. CLI exit code 2. */
export class ConfigError extends InvalidArgument {
  constructor(message: string, hint?: string) {
    super(message, { hint, data: { config: true } });
    this.name = 'ConfigError';
  }
}

export function isConfigError(e: unknown): boolean {
  return e instanceof InvalidArgument && (e as InvalidArgument).data?.config === true;
}
