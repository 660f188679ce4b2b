/**
 * The pool's metadata: which file is which layer, which layer is a volume's active layer or a
 * snapshot, who owns what and when it was made. One SQLite file in the pool folder, so every
 * change is one atomic transaction that survives a crash (WAL, synchronous=FULL).
 *
 * Files are only ever created after a `pending` layer row names them (intent first), and only
 * removed after their row was switched to `deleting` in the same transaction that dropped what
 * referred to them. So a crash at any instant leaves either a complete record or a row saying
 * which file is half made or half gone — what `pool check --repair` finishes.
 */
import Database from 'better-sqlite3';
import { BackendUnavailable } from '../../../core/index.js';

export const METADATA_FILE = '.offload-pool.db';

/** `merged`: a layer whose file holds its one child's content too and is to replace the child's file (layers.ts, commitChildDown). */
export type LayerState = 'pending' | 'ready' | 'merged' | 'deleting';

export interface LayerRow {
  /** File name inside the pool folder (also the backing name other layers store). */
  file: string;
  /** The volume this layer belongs to (deleted with it). */
  volume: string;
  /** The layer this one is backed by, or null for a base layer. */
  parent: string | null;
  state: LayerState;
  /** The process that wrote the row (a pending row of a live process is work in progress). */
  pid: number;
  createdAt: string;
}

export interface VolumeRow {
  name: string;
  /** The layer guests write: always the top of the volume's chain, never a backing file. */
  active: string;
  sizeBytes: number;
  owner: string | null;
  createdAt: string;
  /** The snapshot (or volume) a linked clone was made from, while it still depends on it. */
  originVolume: string | null;
  originSnapshot: string | null;
}

export interface SnapshotRow {
  volume: string;
  name: string;
  /** The frozen layer holding the volume's data at snapshot time. */
  layer: string;
  sizeBytes: number;
  createdAt: string;
}

const SCHEMA = `
CREATE TABLE IF NOT EXISTS layers (
  file TEXT PRIMARY KEY,
  volume TEXT NOT NULL,
  parent TEXT,
  state TEXT NOT NULL,
  pid INTEGER NOT NULL,
  created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS layers_parent ON layers(parent);
CREATE INDEX IF NOT EXISTS layers_volume ON layers(volume);
CREATE TABLE IF NOT EXISTS volumes (
  name TEXT PRIMARY KEY,
  active TEXT NOT NULL,
  size INTEGER NOT NULL,
  owner TEXT,
  created_at TEXT NOT NULL,
  origin_volume TEXT,
  origin_snapshot TEXT
);
CREATE TABLE IF NOT EXISTS pool_lock (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  holder TEXT NOT NULL,
  pid INTEGER NOT NULL,
  since TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS open_volumes (
  volume TEXT NOT NULL,
  holder TEXT NOT NULL,
  pid INTEGER NOT NULL,
  PRIMARY KEY (volume, holder)
);
CREATE TABLE IF NOT EXISTS snapshot_readers (
  layer TEXT NOT NULL,
  holder TEXT NOT NULL,
  pid INTEGER NOT NULL,
  PRIMARY KEY (layer, holder)
);
CREATE TABLE IF NOT EXISTS snapshots (
  volume TEXT NOT NULL,
  name TEXT NOT NULL,
  layer TEXT NOT NULL,
  size INTEGER NOT NULL,
  created_at TEXT NOT NULL,
  PRIMARY KEY (volume, name)
);
`;

interface RawLayer { file: string; volume: string; parent: string | null; state: LayerState; pid: number; created_at: string }
interface RawVolume { name: string; active: string; size: number; owner: string | null; created_at: string; origin_volume: string | null; origin_snapshot: string | null }
interface RawSnapshot { volume: string; name: string; layer: string; size: number; created_at: string }

const layer = (r: RawLayer): LayerRow => ({ file: r.file, volume: r.volume, parent: r.parent, state: r.state, pid: r.pid, createdAt: r.created_at });
const volume = (r: RawVolume): VolumeRow => ({
  name: r.name, active: r.active, sizeBytes: r.size, owner: r.owner, createdAt: r.created_at,
  originVolume: r.origin_volume, originSnapshot: r.origin_snapshot,
});
const snapshot = (r: RawSnapshot): SnapshotRow => ({ volume: r.volume, name: r.name, layer: r.layer, sizeBytes: r.size, createdAt: r.created_at });

/** The pool's SQLite metadata: layers, volumes, snapshots (see above). */
export class PoolMetadata {
  private readonly db: Database.Database;

  constructor(readonly path: string) {
    try {
      this.db = new Database(path);
      this.db.pragma('journal_mode = WAL');
      this.db.pragma('synchronous = FULL');
      this.db.pragma('busy_timeout = 5000');
      this.db.exec(SCHEMA);
    } catch (e) {
      throw new BackendUnavailable(`cannot open the pool metadata ${path}: ${(e as Error).message}`, {
        ref: path, cause: e, hint: 'the pool folder must be writable; a damaged metadata file can be restored from backup',
      });
    }
  }

  /** Run `fn` as one transaction: all of its changes land, or none. */
  tx<T>(fn: () => T): T {
    return this.db.transaction(fn).immediate();
  }

  // ---- layers ----

  addLayer(row: Omit<LayerRow, 'createdAt'> & { createdAt?: string }): void {
    this.db.prepare('INSERT INTO layers (file, volume, parent, state, pid, created_at) VALUES (?, ?, ?, ?, ?, ?)')
      .run(row.file, row.volume, row.parent, row.state, row.pid, row.createdAt ?? new Date().toISOString());
  }

  layer(file: string): LayerRow | undefined {
    const r = this.db.prepare('SELECT * FROM layers WHERE file = ?').get(file) as RawLayer | undefined;
    return r && layer(r);
  }

  layers(): LayerRow[] {
    return (this.db.prepare('SELECT * FROM layers ORDER BY file').all() as RawLayer[]).map(layer);
  }

  layersOf(volumeName: string): LayerRow[] {
    return (this.db.prepare('SELECT * FROM layers WHERE volume = ? ORDER BY file').all(volumeName) as RawLayer[]).map(layer);
  }

  /** Layers backed directly by `file` (whatever their state: a pending child is a child too). */
  children(file: string): LayerRow[] {
    return (this.db.prepare('SELECT * FROM layers WHERE parent = ? ORDER BY file').all(file) as RawLayer[]).map(layer);
  }

  setLayerState(file: string, state: LayerState): void {
    this.db.prepare('UPDATE layers SET state = ?, pid = ? WHERE file = ?').run(state, process.pid, file);
  }

  setParent(file: string, parent: string | null): void {
    this.db.prepare('UPDATE layers SET parent = ? WHERE file = ?').run(parent, file);
  }

  removeLayer(file: string): void {
    this.db.prepare('DELETE FROM layers WHERE file = ?').run(file);
  }

  /** Whether a layer is `merged` (a rotation's delete to finish). */
  hasMerged(): boolean {
    return this.db.prepare("SELECT 1 FROM layers WHERE state = 'merged' LIMIT 1").get() !== undefined;
  }

  /** The chain of layer rows from `file` down to its base. */
  chain(file: string): LayerRow[] {
    const out: LayerRow[] = [];
    const seen = new Set<string>();
    for (let f: string | null = file; f !== null && !seen.has(f); ) {
      seen.add(f);
      const row = this.layer(f);
      if (!row) break;
      out.push(row);
      f = row.parent;
    }
    return out;
  }

  // ---- volumes ----

  addVolume(row: VolumeRow): void {
    this.db.prepare('INSERT INTO volumes (name, active, size, owner, created_at, origin_volume, origin_snapshot) VALUES (?, ?, ?, ?, ?, ?, ?)')
      .run(row.name, row.active, row.sizeBytes, row.owner, row.createdAt, row.originVolume, row.originSnapshot);
  }

  volume(name: string): VolumeRow | undefined {
    const r = this.db.prepare('SELECT * FROM volumes WHERE name = ?').get(name) as RawVolume | undefined;
    return r && volume(r);
  }

  /** Volumes in name order, after `after` when given. */
  volumes(after?: string, limit = -1): VolumeRow[] {
    const rows = after === undefined
      ? this.db.prepare('SELECT * FROM volumes ORDER BY name LIMIT ?').all(limit)
      : this.db.prepare('SELECT * FROM volumes WHERE name > ? ORDER BY name LIMIT ?').all(after, limit);
    return (rows as RawVolume[]).map(volume);
  }

  countVolumesAfter(after: string): number {
    return (this.db.prepare('SELECT COUNT(*) AS n FROM volumes WHERE name > ?').get(after) as { n: number }).n;
  }

  updateVolume(name: string, patch: Partial<Pick<VolumeRow, 'active' | 'sizeBytes' | 'originVolume' | 'originSnapshot'>>): void {
    const cur = this.volume(name);
    if (!cur) return;
    const next = { ...cur, ...patch };
    this.db.prepare('UPDATE volumes SET active = ?, size = ?, origin_volume = ?, origin_snapshot = ? WHERE name = ?')
      .run(next.active, next.sizeBytes, next.originVolume, next.originSnapshot, name);
  }

  removeVolume(name: string): void {
    this.db.prepare('DELETE FROM volumes WHERE name = ?').run(name);
    this.db.prepare('DELETE FROM snapshots WHERE volume = ?').run(name);
  }

  /** The volume whose active layer is `file`, if any. */
  volumeByActive(file: string): VolumeRow | undefined {
    const r = this.db.prepare('SELECT * FROM volumes WHERE active = ?').get(file) as RawVolume | undefined;
    return r && volume(r);
  }

  // ---- snapshots ----

  addSnapshot(row: SnapshotRow): void {
    this.db.prepare('INSERT INTO snapshots (volume, name, layer, size, created_at) VALUES (?, ?, ?, ?, ?)')
      .run(row.volume, row.name, row.layer, row.sizeBytes, row.createdAt);
  }

  snapshot(volumeName: string, name: string): SnapshotRow | undefined {
    const r = this.db.prepare('SELECT * FROM snapshots WHERE volume = ? AND name = ?').get(volumeName, name) as RawSnapshot | undefined;
    return r && snapshot(r);
  }

  snapshots(volumeName: string): SnapshotRow[] {
    return (this.db.prepare('SELECT * FROM snapshots WHERE volume = ? ORDER BY created_at, name').all(volumeName) as RawSnapshot[]).map(snapshot);
  }

  /** Snapshots held by a layer (several names may share one frozen layer). */
  snapshotsOnLayer(file: string): SnapshotRow[] {
    return (this.db.prepare('SELECT * FROM snapshots WHERE layer = ? ORDER BY name').all(file) as RawSnapshot[]).map(snapshot);
  }

  removeSnapshot(volumeName: string, name: string): void {
    this.db.prepare('DELETE FROM snapshots WHERE volume = ? AND name = ?').run(volumeName, name);
  }

  // ---- between processes (see pool-state.ts) ----

  /**
   * Take the pool's change lock for `holder` (a process's token) if it is free, or held by a
   * process that is gone (`alive` says). Returns the holder's pid when it is someone else's.
   */
  tryLock(holder: string, alive: (pid: number, holder: string) => boolean): number | undefined {
    return this.tx(() => {
      const r = this.db.prepare('SELECT holder, pid FROM pool_lock WHERE id = 1').get() as { holder: string; pid: number } | undefined;
      if (r && r.holder !== holder && alive(r.pid, r.holder)) return r.pid;
      this.db.prepare('INSERT OR REPLACE INTO pool_lock (id, holder, pid, since) VALUES (1, ?, ?, ?)').run(holder, process.pid, new Date().toISOString());
      return undefined;
    });
  }

  unlock(holder: string): void {
    this.db.prepare('DELETE FROM pool_lock WHERE id = 1 AND holder = ?').run(holder);
  }

  /** `holder` has `volume` open (read-write data path) until closeVolume. */
  openVolume(volume: string, holder: string): void {
    this.db.prepare('INSERT OR REPLACE INTO open_volumes (volume, holder, pid) VALUES (?, ?, ?)').run(volume, holder, process.pid);
  }

  closeVolume(volume: string, holder: string): void {
    this.db.prepare('DELETE FROM open_volumes WHERE volume = ? AND holder = ?').run(volume, holder);
  }

  /** Who else has `volume` open: holder tokens with their pids. */
  openedBy(volume: string, except: string): { holder: string; pid: number }[] {
    return this.db.prepare('SELECT holder, pid FROM open_volumes WHERE volume = ? AND holder <> ? ORDER BY holder').all(volume, except) as { holder: string; pid: number }[];
  }

  /** `holder` reads the snapshot layer `file` (openSnapshot) until stopReading: no delete writes into that layer meanwhile. */
  startReading(file: string, holder: string): void {
    this.db.prepare('INSERT OR REPLACE INTO snapshot_readers (layer, holder, pid) VALUES (?, ?, ?)').run(file, holder, process.pid);
  }

  stopReading(file: string, holder: string): void {
    this.db.prepare('DELETE FROM snapshot_readers WHERE layer = ? AND holder = ?').run(file, holder);
  }

  /** Who else reads the snapshot layer `file`: holder tokens with their pids. */
  readersOf(file: string, except: string): { holder: string; pid: number }[] {
    return this.db.prepare('SELECT holder, pid FROM snapshot_readers WHERE layer = ? AND holder <> ? ORDER BY holder').all(file, except) as { holder: string; pid: number }[];
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}
