/**
 * An LRU cache of metadata clusters (L2 tables, refcount blocks) keyed by host offset, bounded
 * by bytes. Write-through: callers write the disk themselves and keep the cached copy current.
 */
export class TableCache {
  private readonly map = new Map<number, Uint8Array>();
  private bytes = 0;

  constructor(private readonly maxBytes: number) {}

  get(offset: number): Uint8Array | undefined {
    const t = this.map.get(offset);
    if (t) {
      this.map.delete(offset);
      this.map.set(offset, t);
    }
    return t;
  }

  /** Whether `offset` is cached (without making it the most recently used). */
  has(offset: number): boolean {
    return this.map.has(offset);
  }

  set(offset: number, table: Uint8Array): void {
    const old = this.map.get(offset);
    if (old) { this.bytes -= old.length; this.map.delete(offset); }
    this.map.set(offset, table);
    this.bytes += table.length;
    while (this.bytes > this.maxBytes && this.map.size > 1) {
      const [k, v] = this.map.entries().next().value as [number, Uint8Array];
      this.map.delete(k);
      this.bytes -= v.length;
    }
  }

  delete(offset: number): void {
    const old = this.map.get(offset);
    if (old) { this.bytes -= old.length; this.map.delete(offset); }
  }

  clear(): void {
    this.map.clear();
    this.bytes = 0;
  }
}
