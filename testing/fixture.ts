/**
 * What both layers of the contract share: one broker over the backend under test, the backend
 * itself (`broker.backend(name)`: no broker checks in front of it), fresh names, cleanup of what
 * the cases made, capability gates that remember what the passing cases exercised, and helpers
 * for data and for running a backend's JobTask without the broker.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ContainerModule } from 'inversify';
import { it, type TestContext } from 'vitest';
import {
  createBroker, JobRun, type BlockDevice, type Broker, type CapabilitySet, type JobTask, type StorageBackend,
} from '../core/index.js';

export interface ContractSetup {
  plugins: readonly ContainerModule[];
  /** The backend's config entry (name, kind, and its fields). */
  backend: Record<string, unknown> & { name: string; kind: string };
  teardown?: () => Promise<void>;
}

export interface ContractTarget {
  name: string;
  setup: () => Promise<ContractSetup>;
  /** Volume size the suite uses (default 32 MiB); a backend with a larger minimum sets it. */
  sizeBytes?: number;
}

export const MiB = 1024 * 1024;

/** A test body; it runs only when the backend reports every capability the case needs. */
export type CaseBody = (ctx: TestContext) => Promise<void> | void;

/** One backend under test: its broker, backend, capabilities, and the volumes a suite made (deleted at the end). */
export class ContractFixture {
  readonly size: number;
  broker!: Broker;
  /** The StorageBackend itself: what the backend layer calls. */
  backend!: StorageBackend;
  caps!: CapabilitySet;
  /** The backend's name in refs (`be/volume`). */
  be!: string;
  /** Capabilities used by cases that passed: a reported capability nobody exercised is unproven. */
  readonly exercised = new Set<string>();
  private setup?: ContractSetup;
  private stateDir?: string;
  private readonly prefix = `ct${Math.random().toString(36).slice(2, 7)}`;
  private n = 0;
  private readonly made: string[] = [];

  constructor(readonly target: ContractTarget) {
    this.size = target.sizeBytes ?? 32 * MiB;
  }

  async start(): Promise<void> {
    this.setup = await this.target.setup();
    this.be = this.setup.backend.name;
    this.stateDir = mkdtempSync(join(tmpdir(), 'offload-contract-'));
    this.broker = await createBroker({ state: this.stateDir, backends: [this.setup.backend] }, { plugins: this.setup.plugins });
    this.backend = this.broker.backend(this.be);
    this.caps = await this.backend.capabilities();
  }

  /** Delete what the cases made (snapshots first, clones before their parents), then stop. */
  async stop(): Promise<void> {
    if (this.broker) {
      for (let round = 0; round < 4 && this.made.length > 0; round++) {
        for (const v of [...this.made].reverse()) {
          try {
            const snaps = await this.backend.listSnapshots(v).catch(() => []);
            for (const s of snaps) await this.backend.deleteSnapshot(v, s.name).catch(() => undefined);
            await this.backend.deleteVolume(v);
            this.made.splice(this.made.indexOf(v), 1);
          } catch {
            // a dependent still exists; the next round gets it
          }
        }
      }
      await this.broker.close();
    }
    await this.setup?.teardown?.();
    if (this.stateDir) rmSync(this.stateDir, { recursive: true, force: true });
  }

  /** A case gated by capabilities; when it passes, they count as exercised. */
  case(title: string, needs: readonly string[], body: CaseBody): void {
    it(title, async (ctx) => {
      if (!this.caps.hasAll(...needs)) ctx.skip(`needs ${needs.join(', ')}`);
      await body(ctx);
      for (const c of needs) this.exercised.add(c);
    });
  }

  /** A fresh volume name, deleted after the suite. */
  name(hint: string): string {
    return this.track(`${this.prefix}-${hint}-${this.n++}`);
  }

  /** Delete this volume after the suite, if it exists then. */
  track(volume: string): string {
    if (!this.made.includes(volume)) this.made.push(volume);
    return volume;
  }

  ref(volume: string): string {
    return `${this.be}/${volume}`;
  }

  /** Create a volume on the backend directly. */
  async create(hint: string, sizeBytes = this.size): Promise<string> {
    const v = this.name(hint);
    await this.backend.createVolume({ name: v, sizeBytes });
    return v;
  }

  /** Write through a device that is opened, flushed and closed around the write. */
  async write(open: (mode: 'r' | 'rw') => Promise<BlockDevice>, offset: number, data: Uint8Array): Promise<void> {
    const dev = await open('rw');
    try {
      await dev.write(offset, data);
      await dev.flush();
    } finally {
      await dev.close();
    }
  }

  async read(open: (mode: 'r' | 'rw') => Promise<BlockDevice>, offset: number, length: number): Promise<Buffer> {
    const dev = await open('r');
    try {
      return Buffer.from(await dev.read(offset, length));
    } finally {
      await dev.close();
    }
  }

  /** Opens a volume through the backend (the backend layer's data path). */
  direct(volume: string): (mode: 'r' | 'rw') => Promise<BlockDevice> {
    return (mode) => this.backend.openVolume!(volume, mode);
  }

  /** Opens a volume through the broker. */
  brokered(volume: string): (mode: 'r' | 'rw') => Promise<BlockDevice> {
    return (mode) => this.broker.volumes.open(this.ref(volume), mode);
  }
}

/** Bytes that differ from one seed to the next and from zero (no all-zero runs). */
export function pattern(seed: number, length: number): Uint8Array {
  return Uint8Array.from({ length }, (_, i) => ((seed * 31 + i * 7) % 255) + 1);
}

export function same(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0;
}

export interface TaskRun {
  progress: { current: number; total: number };
  /** The last state the task saved (its checkpoint). */
  state: unknown;
}

/**
 * Run a backend's JobTask to the end without the broker, with a context that behaves as the
 * broker's does for a job nobody pauses, cancels or limits (a ready job is completed at once).
 */
export async function runTask(task: JobTask): Promise<TaskRun> {
  const run: TaskRun = { progress: { current: 0, total: 0 }, state: undefined };
  const ctx = new JobRun({
    jobId: `contract-${Math.random().toString(36).slice(2, 10)}`,
    checkpointEveryMs: 0,
    onProgress: (current, total) => { run.progress = { current, total }; },
    onSave: (state) => { run.state = state; },
  });
  ctx.complete();
  await task.run(ctx);
  return run;
}
