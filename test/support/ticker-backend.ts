/**
 * A test-only backend whose only job is a "stream" that ticks through N steps, saving a
 * checkpoint after each. With `resumable: true` it can rebuild the task after a restart and
 * continue from the last checkpoint; otherwise a restarted broker must fail the job as interrupted.
 */
import { appendFileSync } from 'node:fs';
import { ContainerModule } from 'inversify';
import { z } from 'zod';
import {
  BackendFactory, CapabilitySet, NotFound, type JobTask, type Page, type StorageBackend, type Volume,
} from '../../core/index.js';

const schema = z.strictObject({
  name: z.string(),
  kind: z.literal('ticker'),
  steps: z.number().int().positive().default(50),
  stepMs: z.number().int().nonnegative().default(20),
  resumable: z.boolean().default(true),
  /** Each executed step appends a line here, so a test can see what ran in which process. */
  log: z.string().optional(),
});
type TickerConfig = z.infer<typeof schema>;

const STEP_BYTES = 1024 * 1024;

class TickerBackend implements StorageBackend {
  readonly kind = 'ticker';
  constructor(readonly name: string, private readonly cfg: TickerConfig) {}

  async capabilities() {
    return new CapabilitySet(['volume.list', 'chain.stream']);
  }

  async createVolume(): Promise<Volume> { throw new NotFound('ticker has no volumes to create'); }
  async getVolume(name: string): Promise<Volume | undefined> {
    return { backend: this.name, name, sizeBytes: this.cfg.steps * STEP_BYTES };
  }
  async listVolumes(): Promise<Page<Volume>> { return { items: [] }; }
  async resizeVolume(): Promise<Volume> { throw new NotFound('no'); }
  async deleteVolume(): Promise<void> {}
  async createSnapshot(): Promise<never> { throw new NotFound('no'); }
  async listSnapshots() { return []; }
  async deleteSnapshot(): Promise<void> {}
  async revertVolume(): Promise<void> {}

  async streamVolume(name: string): Promise<JobTask> {
    return this.task(name);
  }

  async resumeTask(type: string, params: Record<string, unknown>): Promise<JobTask | undefined> {
    if (!this.cfg.resumable || type !== 'stream') return undefined;
    return this.task(String(params.volume));
  }

  private task(volume: string): JobTask {
    const cfg = this.cfg;
    return {
      type: 'stream',
      params: { volume },
      async run(ctx) {
        const from = (ctx.resumeFrom as { step?: number } | undefined)?.step ?? 0;
        ctx.setTotal(cfg.steps * STEP_BYTES);
        for (let step = from; step < cfg.steps; step++) {
          await new Promise((r) => setTimeout(r, cfg.stepMs));
          if (cfg.log) appendFileSync(cfg.log, `${process.pid} ${step}\n`);
          await ctx.checkpoint(STEP_BYTES, { step: step + 1 });
        }
      },
    };
  }
}

export const tickerModule = new ContainerModule(({ bind }) => {
  bind(BackendFactory).toConstantValue({
    kind: 'ticker',
    description: 'test backend with a resumable job (not shipped)',
    configSchema: schema as never,
    async create(config: TickerConfig) {
      return new TickerBackend(config.name, config);
    },
  } satisfies BackendFactory<TickerConfig>);
});
