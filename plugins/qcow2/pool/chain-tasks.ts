/**
 * The pool's chain jobs as core JobTasks: stream a volume's own layers free of what lies below
 * them (up to `base`), and commit its active layer into the layer below (an active commit that
 * pivots by itself once in sync). Their params are plain JSON: a restarted broker rebuilds them
 * with resumeTask, and they continue from their checkpoint.
 */
import { closeAfter, FailedPrecondition, InvalidArgument, NotFound, type JobTask } from '../../../core/index.js';
import { runCommit, runStream } from '../jobs/index.js';
import { compact, unlinkLayers, withWritable } from './layers.js';
import type { VolumeRow } from './metadata.js';
import type { PoolState } from './pool-state.js';

/** `base` of a stream: a snapshot (`vol@snap` or a snapshot name) or a volume in the chain below. */
export function resolveBase(p: PoolState, v: VolumeRow, below: string | null, base: string): string {
  const r = p.ref(v.name);
  const chain = below === null ? [] : p.meta.chain(below);
  const at = base.indexOf('@');
  for (const l of chain) {
    const snaps = p.meta.snapshotsOnLayer(l.file);
    const hit = at >= 0
      ? snaps.some((s) => `${s.volume}@${s.name}` === base || `${p.ref(s.volume)}@${s.name}` === base)
      : snaps.some((s) => s.name === base) || l.volume === base || p.ref(l.volume) === base;
    if (hit) return l.file;
  }
  throw new NotFound(`stream ${r}: base ${JSON.stringify(base)} is not below the volume's own layers`, {
    ref: r, hint: chain.length === 0 ? 'the volume depends on nothing: there is nothing to stream' : `ancestors: ${chain.map((l) => p.layerRef(l.file)).join(', ')}`,
  });
}

/** Pull into `target` (the volume's lowest own layer) everything above `base`, then re-point it. */
export function streamTask(p: PoolState, volume: string, target: string, base: string | null): JobTask {
  return {
    type: 'stream',
    params: { volume, target, base },
    run: async (ctx) => {
      const v = p.mustVolume(volume);
      const layer = p.meta.layer(target);
      if (!layer || layer.volume !== volume || p.meta.chain(v.active).every((l) => l.file !== target)) {
        throw new FailedPrecondition(`stream ${p.ref(volume)}: the volume's layers changed since the job was made`, { ref: p.ref(volume), hint: 'start the stream again' });
      }
      if (layer.parent === base) return; // nothing above base to pull
      p.claim(volume, 'stream');
      try {
        await withWritable(p, volume, target, (img) => runStream(img, base === null ? {} : { base: p.abs(base) }, ctx), ctx);
        await ctx.confirmLease();
        await p.serial.run(async () => {
          const old = layer.parent;
          const affected = p.volumesAbove(target);
          p.meta.setParent(target, base);
          await p.open.reopen(affected);
          if (old !== null) await compact(p, old);
        });
      } finally {
        p.release(volume);
      }
    },
  };
}

/** The layer a commit of `v` merges into, or the reason it cannot. */
export function commitTarget(p: PoolState, v: VolumeRow, base: string | undefined): string {
  const active = p.meta.layer(v.active)!;
  const r = p.ref(v.name);
  if (active.parent === null) {
    throw new FailedPrecondition(`commit ${r}: the volume has no parent layer to merge into`, { ref: r, hint: 'a volume without snapshots or source has nothing to commit into' });
  }
  const parent = p.meta.layer(active.parent)!;
  if (parent.volume !== v.name) {
    const src = p.layerRef(parent.file);
    throw new FailedPrecondition(`commit ${r}: its parent ${src} belongs to ${p.ref(parent.volume)} and is shared; merging into it would change ${src}`, {
      ref: r, hint: `stream ${r} to make it independent instead`,
    });
  }
  const others = p.meta.children(parent.file).filter((c) => c.file !== active.file);
  if (others.length > 0) {
    throw new FailedPrecondition(`commit ${r}: its parent layer ${p.layerRef(parent.file)} is also the base of ${others.map((o) => p.layerRef(o.file)).join(', ')}`, {
      ref: r, hint: 'delete or stream those first',
    });
  }
  const snaps = p.meta.snapshotsOnLayer(parent.file);
  if (snaps.length > 0) {
    const names = snaps.map((s) => s.name);
    const ok = base !== undefined && snaps.some((s) => base === s.name || base === `${v.name}@${s.name}` || base === `${r}@${s.name}`);
    if (!ok) {
      throw new FailedPrecondition(`commit ${r}: merging into its parent layer gives up snapshot ${names.map((n) => `${r}@${n}`).join(', ')}`, {
        ref: r, hint: `pass --base ${names[0]} to commit into it (the snapshot goes), or delete the snapshot instead`,
      });
    }
  } else if (base !== undefined && base !== '') {
    throw new InvalidArgument(`commit ${r}: base ${JSON.stringify(base)} is not the volume's parent layer`, { ref: r, hint: 'a pool volume commits into its direct parent only' });
  }
  return parent.file;
}

/** Merge the active layer `top` into `into` while the volume is in use, then continue on `into`. */
export function commitTask(p: PoolState, volume: string, top: string, into: string): JobTask {
  return {
    type: 'commit',
    params: { volume, top, into },
    run: async (ctx) => {
      // Started within a structural section, as an open is: a change left half done (a rotation's
      // `merged` layer, which moves files) is finished before the job opens any of them, and no
      // merge starts under the job once it holds the volume.
      const ov = await p.serial.run(async () => {
        const v = p.mustVolume(volume);
        if (v.active === into) return undefined; // pivoted already (a resumed job whose work was done)
        if (v.active !== top || p.meta.layer(top)?.parent !== into) {
          throw new FailedPrecondition(`commit ${p.ref(volume)}: the volume's layers changed since the job was made`, { ref: p.ref(volume), hint: 'start the commit again' });
        }
        commitTarget(p, v, p.meta.snapshotsOnLayer(into)[0]?.name);
        p.claim(volume, 'commit');
        try {
          // The snapshots on `into` go as the copy into it starts, not at the switch: from the first
          // cluster copied their content is no longer the point they named (QEMU's commit
          // invalidates its base as it starts). A cancelled or failed job leaves `into` hidden.
          const given = p.meta.snapshotsOnLayer(into);
          if (given.length > 0) await ctx.confirmLease(); // a change of the pool's record: one runner
          if (given.length > 0) p.meta.tx(() => { for (const s of given) p.meta.removeSnapshot(s.volume, s.name); });
          return p.open.acquire(volume);
        } catch (e) {
          p.release(volume);
          throw e;
        }
      });
      if (!ov) return;
      try {
        try {
          const img = await ov.lock.shared(() => ov.current());
          await p.opts.hooks?.activeCommit?.('copying');
          // One operation for the caller: it pivots as soon as base is in sync, recording the
          // pivot while the writers are held (a crash after the switch finds the volume on `into`).
          await runCommit(img, {
            base: p.abs(into), active: true, pivotWhenReady: true,
            aroundPivot: (pivot) => p.serial.run(pivot),
            record: async () => {
              await p.opts.hooks?.activeCommit?.('in-sync');
              p.meta.tx(() => {
                p.meta.updateVolume(volume, { active: into });
                p.meta.setLayerState(top, 'deleting');
              });
              await p.opts.hooks?.activeCommit?.('recorded');
            },
          }, ctx);
          await p.opts.hooks?.activeCommit?.('switched');
          // Open `into` again as the pool opens an active layer, and drop the old top.
          await p.serial.run(async () => {
            await ov.swap(async () => undefined);
            await unlinkLayers(p, [top]);
          });
        } finally {
          await p.open.release(ov, closeAfter(ctx));
        }
      } finally {
        p.release(volume);
      }
    },
  };
}

/** Rebuild a stored stream or commit task (undefined: its volume is gone, or the params are not ours). */
export function resumeChainTask(p: PoolState, type: string, params: Record<string, unknown>): JobTask | undefined {
  const str = (k: string) => (typeof params[k] === 'string' ? params[k] as string : undefined);
  const volume = str('volume');
  if (volume === undefined || !p.meta.volume(volume)) return undefined;
  if (type === 'stream' && str('target') !== undefined) {
    const base = params.base === null ? null : str('base');
    if (base === undefined) return undefined;
    return streamTask(p, volume, str('target')!, base);
  }
  if (type === 'commit' && str('top') !== undefined && str('into') !== undefined) return commitTask(p, volume, str('top')!, str('into')!);
  return undefined;
}
