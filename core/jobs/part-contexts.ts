import type { JobContext } from './job-task.js';

/** The saved state of a job made of parts: each part's own state, in order. */
export interface PartsState {
  parts: unknown[];
  /** Each part's progress when saved, so that a resumed job counts the parts it does not run again. */
  done?: number[];
  totals?: number[];
}

/**
 * A job made of parts (a backup of a VM's disks, copied at once), each part
 * written as if it were the whole job: part i's context resumes from and saves its own slot of
 * the job's state (`{ parts: [...] }`, every slot saved together), and its progress adds to the
 * other parts'. Everything else (cancel, pause, the speed limit, the lease) is the job's.
 */
export function partContexts(ctx: JobContext, n: number): JobContext[] {
  const saved = ctx.resumeFrom as Partial<PartsState> | undefined;
  const at = (list: unknown, i: number) => (Array.isArray(list) ? list[i] : undefined);
  const count = (v: unknown) => (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0 ? v : 0);
  const slots: unknown[] = Array.from({ length: n }, (_, i) => at(saved?.parts, i));
  const done = Array.from({ length: n }, (_, i) => count(at(saved?.done, i)));
  const totals = Array.from({ length: n }, (_, i) => count(at(saved?.totals, i)));
  const sum = (a: number[]) => a.reduce((x, y) => x + y, 0);
  /** A part's progress never past its total (a resumed part redoes what followed its saved offset). */
  const clamp = (i: number) => {
    if (totals[i]! > 0) done[i] = Math.min(done[i]!, totals[i]!);
  };
  for (let i = 0; i < n; i++) clamp(i);
  const whole = (): PartsState => ({ parts: [...slots], done: [...done], totals: [...totals] });
  if (sum(totals) > 0) ctx.setProgress(sum(done), sum(totals));
  return slots.map((resumeFrom, i): JobContext => ({
    jobId: ctx.jobId,
    signal: ctx.signal,
    resumeFrom,
    leaseUntil: ctx.leaseUntil,
    get speed() {
      return ctx.speed;
    },
    get completeRequested() {
      return ctx.completeRequested;
    },
    setTotal(bytes) {
      totals[i] = Math.max(0, bytes);
      clamp(i);
      ctx.setTotal(sum(totals));
    },
    advance(bytes) {
      done[i]! += Math.max(0, bytes);
      clamp(i);
      ctx.advance(bytes);
    },
    setProgress(current, total) {
      // The part's own figure, as the part knows it now (a resumed copy starts again from its offset).
      done[i] = Math.max(0, current);
      if (total !== undefined) totals[i] = total;
      clamp(i);
      ctx.setProgress(sum(done), sum(totals));
    },
    checkpoint(bytesMoved, state) {
      done[i]! += Math.max(0, bytesMoved);
      clamp(i);
      if (state === undefined) return ctx.checkpoint(bytesMoved);
      slots[i] = state;
      return ctx.checkpoint(bytesMoved, whole());
    },
    saveState(state) {
      slots[i] = state;
      return ctx.saveState(whole());
    },
    pace: (bytes) => (ctx.pace ? ctx.pace(bytes) : ctx.checkpoint(bytes)),
    beforeSave: (fn) => ctx.beforeSave(fn),
    ready: () => ctx.ready(),
    waitForComplete: () => ctx.waitForComplete(),
    confirmLease: () => ctx.confirmLease(),
    checkLease: () => ctx.checkLease(),
  }));
}
