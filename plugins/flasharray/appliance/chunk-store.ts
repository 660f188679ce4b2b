/**
 * Where the mock array keeps volume data: fixed-size chunks, immutable once written, addressed
 * by a number. Volumes, snapshots and copies share chunks by id (the array model counts the
 * references); a write makes a new chunk (copy-on-write), so a chunk is never changed in place
 * and a crash can only leave unreferenced chunk files behind, which `load` sweeps away.
 */
import { mkdir, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

/** 64 KiB: small enough that a 512-byte write copies little, large enough to keep maps short. */
export const CHUNK_SIZE = 64 * 1024;

export interface ChunkStore {
  read(id: number): Promise<Buffer>;
  write(id: number, data: Buffer): Promise<void>;
  remove(id: number): Promise<void>;
  /** Every chunk id present (used to sweep chunks no object refers to). */
  list(): Promise<number[]>;
}

export class MemoryChunkStore implements ChunkStore {
  private readonly chunks = new Map<number, Buffer>();

  async read(id: number): Promise<Buffer> {
    const c = this.chunks.get(id);
    if (!c) throw new Error(`chunk ${id} is missing`);
    return c;
  }
  async write(id: number, data: Buffer): Promise<void> {
    this.chunks.set(id, Buffer.from(data));
  }
  async remove(id: number): Promise<void> {
    this.chunks.delete(id);
  }
  async list(): Promise<number[]> {
    return [...this.chunks.keys()];
  }
}

export class FileChunkStore implements ChunkStore {
  constructor(private readonly dir: string) {}

  async init(): Promise<void> {
    await mkdir(this.dir, { recursive: true });
  }
  private path(id: number): string {
    return join(this.dir, `${id}.chunk`);
  }
  async read(id: number): Promise<Buffer> {
    return readFile(this.path(id));
  }
  async write(id: number, data: Buffer): Promise<void> {
    await writeFile(this.path(id), data);
  }
  async remove(id: number): Promise<void> {
    await rm(this.path(id), { force: true });
  }
  async list(): Promise<number[]> {
    const names = await readdir(this.dir);
    return names.filter((n) => /^\d+\.chunk$/.test(n)).map((n) => Number(n.slice(0, -6)));
  }
}
