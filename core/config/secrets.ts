/**
 * Secret values from the config (fields a plugin marks secret). Anything printed — errors, log
 * lines, `--json` output — goes through `redact` first, so a secret never leaves the process.
 */
export const REDACTED = '***';

/** The secret values seen so far, to redact from every error, log line and output. */
export class SecretRegistry {
  private readonly values = new Set<string>();

  add(value: unknown): void {
    // Very short values would redact innocent text everywhere; they are still hidden in config dumps.
    if (typeof value === 'string' && value.length >= 4) this.values.add(value);
  }

  /** Replace every known secret value inside `text`. */
  redact(text: string): string {
    let out = text;
    for (const v of this.values) out = out.split(v).join(REDACTED);
    return out;
  }

  /** A deep copy of a JSON-like value with every secret string replaced. */
  redactValue<T>(value: T): T {
    if (typeof value === 'string') return this.redact(value) as T;
    if (Array.isArray(value)) return value.map((v) => this.redactValue(v)) as T;
    if (value && typeof value === 'object' && (value as object).constructor === Object) {
      const out: Record<string, unknown> = {};
      for (const [k, v] of Object.entries(value)) out[k] = this.redactValue(v);
      return out as T;
    }
    return value;
  }
}

/** The process-wide registry: secrets are secrets whichever broker loaded them. */
export const secrets = new SecretRegistry();
