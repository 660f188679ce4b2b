/**
 * A JobContext for chain work the pool runs inside a short call (merging a deleted snapshot's
 * layer into the layer above it): no progress to report, nothing to pause, never cancelled.
 */
import type { JobContext } from '../../../core/index.js';

export function inlineContext(label: string): JobContext {
  const signal = new AbortController().signal;
  return {
    jobId: `inline:${label}`,
    signal,
    resumeFrom: undefined,
    setTotal() {},
    advance() {},
    setProgress() {},
    async checkpoint() {},
    saveState() {},
    ready() {},
    async waitForComplete() {},
    completeRequested: true,
  };
}

/**
 * The broker's context for a commit, except that a mirror-like commit completes by itself once
 * it is ready: `offload commit` is one operation that ends with the volume on the merged layer.
 */
export function autoCompleting(ctx: JobContext): JobContext {
  return new Proxy(ctx, {
    get(target, prop, receiver) {
      if (prop === 'waitForComplete') return async () => {};
      if (prop === 'completeRequested') return true;
      const v = Reflect.get(target, prop, receiver);
      return typeof v === 'function' ? v.bind(target) : v;
    },
  });
}
