import type { FileFormat } from '../backend/file-format.js';
import { rawFileFormat } from '../backend/raw-file.js';
import { InvalidArgument } from '../model/errors.js';

/**
 * The image file formats a broker knows: core's `raw`, then the plugins' (a plugin's format of a
 * name already known replaces it: the qcow2 plugin's engine-backed `raw` wins over core's).
 */
export class FileFormats {
  private readonly byName = new Map<string, FileFormat>();

  constructor(plugins: readonly FileFormat[] = []) {
    for (const f of [rawFileFormat, ...plugins]) this.byName.set(f.name, f);
  }

  get names(): string[] {
    return [...this.byName.keys()].sort();
  }

  /** The format called `name`; InvalidArgument naming the known ones otherwise. */
  get(name: unknown, what = 'image format'): FileFormat {
    const f = typeof name === 'string' ? this.byName.get(name) : undefined;
    if (!f) throw new InvalidArgument(`unknown ${what} ${JSON.stringify(name) ?? String(name)}`, { hint: `known formats: ${this.names.join(', ')}` });
    return f;
  }

  /** The format of an existing file: the first whose probe claims it, else raw (as qemu-img probes). */
  async probe(path: string): Promise<FileFormat> {
    for (const f of this.byName.values()) if (f.probe && (await f.probe(path))) return f;
    return this.get('raw');
  }
}
