/** An operation the planner can explain. Refs are `backend/volume[@snapshot]` strings. */
export type Operation =
  | { op: 'create'; ref: string; sizeBytes: number }
  | { op: 'clone'; source: string; target: string; mode?: 'linked' | 'full'; sizeBytes?: number; prefer?: 'native' | 'host' }
  | { op: 'stream'; ref: string; base?: string }
  | { op: 'commit'; ref: string; base?: string }
  | { op: 'copy'; source: string; target: string; prefer?: 'native' | 'host' }
  | { op: 'snapshot'; ref: string }
  | { op: 'revert'; ref: string }
  | { op: 'delete'; ref: string }
  | { op: 'resize'; ref: string; sizeBytes: number }
  | { op: 'export'; source: string; file: string; format?: string }
  | { op: 'import'; file: string; target: string; create?: boolean };

export interface PlanStep {
  /** What this step does, e.g. `clone.linked`, `chain.stream`, `data.copy`. */
  action: string;
  /** `backend:NAME` when offloaded to a backend, `host` for the host data mover. */
  executor: string;
  /** Bytes this step moves through the host (0 when offloaded); undefined when unknown. */
  hostBytes?: number;
  /** Why this executor was chosen. */
  reason: string;
}

export interface Plan {
  operation: Operation;
  /** False when nothing can execute the operation; `reason` then says why. */
  supported: boolean;
  steps: PlanStep[];
  reason: string;
}
