import type { StorageBackend } from '../backend/storage-backend.js';
import type { CapabilitySet } from '../model/capabilities.js';
import { isSnapshotRef, parseRef, parseVolumeRef, type Ref } from '../model/refs.js';
import { NotFound } from '../model/errors.js';
import type { Operation, Plan, PlanStep } from './plan.js';

export interface PlannerBackend {
  backend: StorageBackend;
  capabilities: CapabilitySet;
}

/**
 * Chooses where each operation runs, in the design's order of preference: native on the owning
 * backend → host data mover over the backends' data paths → Unsupported with the reason.
 * `plan()` only explains; the broker executes what it explains.
 */
export class Planner {
  constructor(private readonly backends: ReadonlyMap<string, PlannerBackend>) {}

  plan(op: Operation): Plan {
    switch (op.op) {
      case 'create':
        return this.single(op, parseVolumeRef(op.ref), 'volume.create', 'create the volume');
      case 'delete':
        return this.single(op, parseRef(op.ref), isSnapshotRef(parseRef(op.ref)) ? 'snapshot.delete' : 'volume.delete', 'delete it');
      case 'resize':
        return this.single(op, parseVolumeRef(op.ref), 'volume.resize', 'resize the volume');
      case 'snapshot':
        return this.single(op, parseRef(op.ref), 'snapshot.create', 'take the snapshot');
      case 'revert':
        return this.single(op, parseRef(op.ref), 'snapshot.revert', 'revert the volume to the snapshot');
      case 'stream':
        return this.single(op, parseVolumeRef(op.ref), 'chain.stream', 'copy the parent\'s data into the volume so it stands alone');
      case 'commit':
        return this.single(op, parseVolumeRef(op.ref), 'chain.commit', 'merge the volume\'s changes into its parent');
      case 'clone':
        return this.planClone(op);
      case 'copy':
        return this.planCopy(op);
      case 'export':
      case 'import':
        return this.planFile(op);
    }
  }

  private get(name: string): PlannerBackend {
    const b = this.backends.get(name);
    if (!b) throw new NotFound(`backend "${name}" is not configured`, { ref: name, hint: `configured backends: ${[...this.backends.keys()].join(', ') || 'none'}` });
    return b;
  }

  private single(op: Operation, ref: Ref, cap: string, what: string): Plan {
    const b = this.get(ref.backend);
    if (b.capabilities.has(cap)) {
      const step: PlanStep = { action: cap, executor: `backend:${ref.backend}`, hostBytes: 0, reason: `${ref.backend} (${b.backend.kind}) has ${cap} natively` };
      return { operation: op, supported: true, steps: [step], reason: `offloaded to ${ref.backend}: it will ${what} itself` };
    }
    return unsupported(op, `${ref.backend} (${b.backend.kind}) does not support ${cap}, and there is no host fallback for it`);
  }

  private planClone(op: Extract<Operation, { op: 'clone' }>): Plan {
    const src = parseRef(op.source);
    const dst = parseVolumeRef(op.target);
    const s = this.get(src.backend);
    const d = this.get(dst.backend);
    if (op.prefer === 'host') {
      if (op.mode === 'linked') return unsupported(op, 'a linked clone shares data with its source: it cannot be made through the host (drop --prefer host, or clone --full)');
      return this.hostCopy(op, src, dst, s, d, true, 'asked to run through the host (--prefer host)');
    }
    if (src.backend === dst.backend) {
      const order: ('clone.linked' | 'clone.full')[] = op.mode === 'linked' ? ['clone.linked'] : op.mode === 'full' ? ['clone.full'] : ['clone.linked', 'clone.full'];
      for (const cap of order) {
        if (s.capabilities.has(cap)) {
          return {
            operation: op, supported: true, reason: `offloaded: ${src.backend} clones natively (${cap})`,
            steps: [{ action: cap, executor: `backend:${src.backend}`, hostBytes: 0, reason: `${src.backend} (${s.backend.kind}) has ${cap}` }],
          };
        }
      }
      if (op.mode === 'linked') return unsupported(op, `${src.backend} (${s.backend.kind}) has no clone.linked; a linked clone shares data with its source and cannot be made by copying (use --full)`);
    } else if (op.mode === 'linked') {
      return unsupported(op, `a linked clone shares data with its source, so it must live on the same backend (${src.backend} ≠ ${dst.backend}); use --full`);
    }
    return this.hostCopy(op, src, dst, s, d, true);
  }

  private planCopy(op: Extract<Operation, { op: 'copy' }>): Plan {
    const src = parseRef(op.source);
    const dst = parseVolumeRef(op.target);
    return this.hostCopy(op, src, dst, this.get(src.backend), this.get(dst.backend), false);
  }

  /** A volume's data into a local file, or a file's into a volume: always the host data mover. */
  private planFile(op: Extract<Operation, { op: 'export' | 'import' }>): Plan {
    const ref = op.op === 'export' ? parseRef(op.source) : parseVolumeRef(op.target);
    const b = this.get(ref.backend);
    const missing: string[] = [];
    if (op.op === 'export') {
      if (!b.capabilities.has('data.read')) missing.push(`${ref.backend} has no data.read`);
      else if (isSnapshotRef(ref) && !(b.capabilities.limits('data.read')?.snapshots === true && b.backend.openSnapshot)) {
        missing.push(`${ref.backend} cannot read a snapshot through its data path (clone it to a volume first)`);
      }
    } else {
      if (!b.capabilities.has('data.write')) missing.push(`${ref.backend} has no data.write`);
      if (op.create && !b.capabilities.has('volume.create')) missing.push(`${ref.backend} has no volume.create`);
    }
    if (missing.length > 0) return unsupported(op, `no host data path: ${missing.join('; ')}`);
    const steps: PlanStep[] = [];
    if (op.op === 'import' && op.create) steps.push({ action: 'volume.create', executor: `backend:${ref.backend}`, hostBytes: 0, reason: 'the target volume is created first, with the file\'s virtual size' });
    steps.push({
      action: 'data.copy', executor: 'host',
      reason: op.op === 'export'
        ? `${b.capabilities.has('data.extents') ? 'only allocated extents are read' : 'the whole volume is read (no extents)'}; the file gets data only where the volume has some (holes stay holes)`
        : 'the file\'s data is copied and its holes are made zero in the volume, through the host data mover',
    });
    return { operation: op, supported: true, steps, reason: `host data mover: ${op.op === 'export' ? `${op.source} into ${op.file}` : `${op.file} into ${op.target}`}` };
  }

  private hostCopy(op: Operation, src: Ref, dst: Ref, s: PlannerBackend, d: PlannerBackend, createTarget: boolean, why?: string): Plan {
    const missing: string[] = [];
    if (!s.capabilities.has('data.read')) missing.push(`${src.backend} has no data.read`);
    if (!d.capabilities.has('data.write')) missing.push(`${dst.backend} has no data.write`);
    if (createTarget && !d.capabilities.has('volume.create')) missing.push(`${dst.backend} has no volume.create`);
    if (isSnapshotRef(src) && !(s.capabilities.limits('data.read')?.snapshots === true && s.backend.openSnapshot)) {
      missing.push(`${src.backend} cannot read a snapshot through its data path (clone it to a volume first)`);
    }
    if (missing.length > 0) return unsupported(op, `${why ? 'no' : 'no native way and no'} host data path: ${missing.join('; ')}`);
    const steps: PlanStep[] = [];
    if (createTarget) steps.push({ action: 'volume.create', executor: `backend:${dst.backend}`, hostBytes: 0, reason: 'the target volume is created first, with the source\'s size' });
    steps.push({
      action: 'data.copy', executor: 'host',
      reason: `${s.capabilities.has('data.extents') ? 'only allocated extents are copied' : 'the whole volume is copied (no extents on the source)'}, through the host data mover`,
    });
    const reason = why ?? (src.backend === dst.backend ? `${src.backend} has no native full copy` : `${src.backend} → ${dst.backend} cannot be done natively`);
    return { operation: op, supported: true, steps, reason: `host data mover: ${reason}` };
  }
}

function unsupported(op: Operation, reason: string): Plan {
  return { operation: op, supported: false, steps: [], reason };
}
