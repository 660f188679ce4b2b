/** A JobContext without a job manager, checkpointing to a file: for the kill tests' child and resumes. */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import type { JobContext } from '../../core/index.js';

export interface FileContext extends JobContext {
  current: number;
  total: number;
  firstProgress: number | undefined;
  onCheckpoint: (() => void) | undefined;
}

export function fileContext(stateFile: string, opts: { autoComplete?: boolean } = {}): FileContext {
  const resumeFrom = existsSync(stateFile) ? JSON.parse(readFileSync(stateFile, 'utf8')) : undefined;
  const ctx: FileContext = {
    jobId: 'kill-test',
    signal: new AbortController().signal,
    resumeFrom,
    current: 0,
    total: 0,
    firstProgress: undefined,
    onCheckpoint: undefined,
    completeRequested: opts.autoComplete ?? false,
    setTotal(n) { ctx.total = n; },
    advance(n) { ctx.current += n; },
    setProgress(c, t) { ctx.current = c; ctx.firstProgress ??= c; if (t !== undefined) ctx.total = t; },
    async checkpoint(n, state) {
      ctx.current += n;
      if (state !== undefined) ctx.saveState(state);
      ctx.onCheckpoint?.();
    },
    saveState(state) { writeFileSync(stateFile, JSON.stringify(state)); },
    ready() {},
    async waitForComplete() {
      if (!opts.autoComplete) throw new Error('no one completes this job');
    },
  };
  return ctx;
}
