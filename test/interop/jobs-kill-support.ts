/** A job run without a job manager, saving every checkpoint to a file: for the kill tests' child and resumes. */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { JobRun } from '../../core/index.js';

/** JobRun plus what the kill tests look at: where progress started, and a hook per checkpoint. */
export class FileContext extends JobRun {
  firstProgress: number | undefined;
  onCheckpoint: (() => void) | undefined;

  constructor(stateFile: string, private readonly autoComplete: boolean) {
    super({
      jobId: 'kill-test',
      resumeFrom: existsSync(stateFile) ? JSON.parse(readFileSync(stateFile, 'utf8')) : undefined,
      checkpointEveryMs: 0,
      onSave: (state) => writeFileSync(stateFile, JSON.stringify(state)),
    });
    if (autoComplete) this.complete();
  }

  get current(): number { return this.progress.current; }
  get total(): number { return this.progress.total; }

  override setProgress(current: number, total?: number): void {
    this.firstProgress ??= current;
    super.setProgress(current, total);
  }

  override async checkpoint(n: number, state?: unknown): Promise<void> {
    await super.checkpoint(n, state);
    this.onCheckpoint?.();
  }

  override waitForComplete(): Promise<void> {
    if (!this.autoComplete) return Promise.reject(new Error('no one completes this job'));
    return super.waitForComplete();
  }
}

export function fileContext(stateFile: string, opts: { autoComplete?: boolean } = {}): FileContext {
  return new FileContext(stateFile, opts.autoComplete ?? false);
}
