/** What one process may ask of another's export (op-calls.ts), and how the serving process answers each kind. */
import type { Principal } from '../locks/principal.js';

/**
 * What may be asked: a snapshot made (`snapshot`) or deleted (`snapshot.delete`), snapshots of
 * several volumes at one instant (`snapshot.group`), a live copy started (`copy.live`, answered
 * with its job's id) — each as the principal who asked, and not after `deadline` (ms since the epoch, the asker's clock), when the asker has
 * stopped waiting (a holder paused past it, an asker that died).
 */
export interface OpCall {
  kind: OpCallKind;
  /** A snapshot of the export's volume, or (`copy.live`) that volume. */
  ref: string;
  /** `snapshot.group`: every snapshot of the group (`ref` among them), taken at one instant. */
  refs?: string[];
  /** `copy.live`: the pairs (`ref` a source among them), the copy's mode and speed, the snapshot its target holds (`since`: one pair), or the live copy it resumes. */
  pairs?: { source: string; target: string }[];
  options?: { mode?: string; speed?: number; resume?: string; since?: string };
  principal: { id: string; role: 'admin' | 'tenant' };
  deadline?: number;
}
export type OpCallKind = 'snapshot' | 'snapshot.delete' | 'snapshot.group' | 'copy.live';

/** How the serving process carries out each kind of call: as `principal`'s view of its broker would. */
export type OpCallHandlers = Record<OpCallKind, (principal: Principal, call: OpCall) => Promise<unknown>>;
