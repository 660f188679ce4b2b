/** Every capability a backend may report. Anything not listed is unsupported. */
export const CAPABILITIES = [
  'volume.create', 'volume.delete', 'volume.resize', 'volume.list',
  'snapshot.create', 'snapshot.delete', 'snapshot.revert',
  'clone.linked', 'clone.full',
  'chain.stream', 'chain.commit',
  'data.read', 'data.write', 'data.extents', 'data.dirty',
] as const;

export type Capability = (typeof CAPABILITIES)[number];

/** Optional limits attached to a capability (e.g. the largest volume a backend accepts). */
export interface CapabilityLimits {
  maxSizeBytes?: number;
  /** Granularity in bytes that sizes are rounded up to. */
  sizeGranularity?: number;
  [key: string]: number | string | boolean | undefined;
}

export function isCapability(name: string): name is Capability {
  return (CAPABILITIES as readonly string[]).includes(name);
}

/** An immutable set of capability names, each with optional limits. */
export class CapabilitySet {
  private readonly map: ReadonlyMap<Capability, CapabilityLimits>;

  constructor(entries: Iterable<Capability | [Capability, CapabilityLimits]>) {
    const map = new Map<Capability, CapabilityLimits>();
    for (const e of entries) {
      const [name, limits] = Array.isArray(e) ? e : [e, {}];
      if (!isCapability(name)) throw new Error(`unknown capability "${String(name)}"`);
      map.set(name, { ...limits });
    }
    this.map = map;
  }

  static of(...names: Capability[]): CapabilitySet {
    return new CapabilitySet(names);
  }

  /** An unknown capability name is simply unsupported. */
  has(name: string): boolean {
    return isCapability(name) && this.map.has(name);
  }

  hasAll(...names: string[]): boolean {
    return names.every((n) => this.has(n));
  }

  limits(name: Capability): CapabilityLimits | undefined {
    return this.map.get(name);
  }

  names(): Capability[] {
    return CAPABILITIES.filter((c) => this.map.has(c));
  }

  toJSON(): Record<string, CapabilityLimits> {
    const out: Record<string, CapabilityLimits> = {};
    for (const n of this.names()) out[n] = { ...this.map.get(n) };
    return out;
  }
}
