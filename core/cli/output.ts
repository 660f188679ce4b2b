import { secrets } from '../config/secrets.js';

export interface OutputStreams {
  stdout: { write(s: string): unknown; isTTY?: boolean };
  stderr: { write(s: string): unknown; isTTY?: boolean };
}

/** Human tables and `--json` output; everything printed is redacted. */
export class Output {
  constructor(private readonly io: OutputStreams, readonly json: boolean) {}

  line(text: string): void {
    this.io.stdout.write(`${secrets.redact(text)}\n`);
  }

  error(text: string): void {
    this.io.stderr.write(`${secrets.redact(text)}\n`);
  }

  print(value: unknown, human?: string | string[] | (() => string | string[]), o: { oneLine?: boolean } = {}): void {
    if (this.json || human === undefined) {
      this.io.stdout.write(`${JSON.stringify(secrets.redactValue(toPlain(value)), null, o.oneLine ? undefined : 2)}\n`);
      return;
    }
    const h = typeof human === 'function' ? human() : human;
    for (const l of Array.isArray(h) ? h : [h]) this.line(l);
  }

  table(rows: Record<string, unknown>[], columns: string[]): void {
    if (this.json) return this.print(rows);
    if (rows.length === 0) return this.line('(none)');
    const cells = rows.map((r) => columns.map((c) => cell(r[c])));
    const widths = columns.map((c, i) => Math.max(c.length, ...cells.map((r) => r[i]!.length)));
    this.line(columns.map((c, i) => c.toUpperCase().padEnd(widths[i]!)).join('  ').trimEnd());
    for (const r of cells) this.line(r.map((v, i) => v.padEnd(widths[i]!)).join('  ').trimEnd());
  }

  /** A progress bar on a TTY (stderr); silent otherwise. */
  progress(label: string): { update(current: number, total: number): void; done(): void } {
    const tty = this.io.stderr.isTTY === true && !this.json;
    let last = -1;
    return {
      update: (current, total) => {
        if (!tty) return;
        const pct = total > 0 ? Math.min(100, (current / total) * 100) : 0;
        if (Math.floor(pct) === last) return;
        last = Math.floor(pct);
        const width = 30;
        const fill = Math.round((pct / 100) * width);
        this.io.stderr.write(`\r${label} [${'#'.repeat(fill)}${'.'.repeat(width - fill)}] ${pct.toFixed(0).padStart(3)}%`);
      },
      done: () => {
        if (tty && last >= 0) this.io.stderr.write('\n');
      },
    };
  }
}

function cell(v: unknown): string {
  if (v === undefined || v === null) return '-';
  if (Array.isArray(v)) return v.join(',');
  if (typeof v === 'object') return JSON.stringify(v);
  return String(v);
}

function toPlain(v: unknown): unknown {
  return v === undefined ? null : JSON.parse(JSON.stringify(v));
}
