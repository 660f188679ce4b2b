/**
 * Incremental backup: `backup VOL --to BACKEND/NAME` keeps a chain of points in the backup volume
 * NAME (its snapshots b1, b2, …): the first point is a full copy, each later one only what
 * changed in VOL since the previous point. What the next point is relative to is a snapshot of VOL
 * (its marker, `bk-<id>-<n>`, id naming the backup volume): each backup takes the new marker
 * first, copies from it (a point in time even while VOL is in use), and drops the old one. Without
 * the previous marker (deleted, or VOL is not the set's source) the point is a full copy again.
 * `restore BACKEND/NAME[@bN] --to VOL` copies a point back. The job: core/copy/backup-task.ts.
 */
import { createHash } from 'node:crypto';
import type { BackupPoint, BackupsApi, CloneOptions, CloneStart } from '../broker-api.js';
import { backupTask, type BackupParams } from '../copy/backup-task.js';
import type { Job } from '../jobs/job.js';
import { AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unsupported } from '../model/errors.js';
import { isSnapshotRef, parseRef, parseVolumeRef, snapshotKey, volumeKey, type SnapshotRef } from '../model/refs.js';
import type { Snapshot } from '../model/types.js';
import type { Access } from './access.js';
import { checkSpeed, need, planOrRefuse } from './operation.js';
import { call, type BrokerState } from './state.js';
import type { Snapshots, Volumes } from './volumes.js';

const POINT = /^b([1-9][0-9]*)$/;

/** What backups need of the other verbs of the same principal's view. */
export interface BackupVerbs {
  volumes: Volumes;
  snapshots: Snapshots;
  copy(source: string, target: string, opts: { speed?: number }): Promise<Job>;
  startClone(source: string, target: string, opts: CloneOptions): Promise<CloneStart>;
}

export class Backups implements BackupsApi {
  constructor(private readonly s: BrokerState, private readonly a: Access, private readonly v: BackupVerbs) {}

  async start(sourceText: string, opts: { to: string; speed?: number }): Promise<Job> {
    if (opts === null || typeof opts !== 'object' || typeof opts.to !== 'string') throw new InvalidArgument('backup takes { to: "backend/name", speed? }');
    const src = parseVolumeRef(sourceText);
    const dst = parseVolumeRef(opts.to);
    const source = `${src.backend}/${src.volume}`;
    const target = `${dst.backend}/${dst.volume}`;
    if (source === target) throw new InvalidArgument(`a volume cannot be backed up into itself: ${source}`, { ref: source });
    const speed = checkSpeed(opts.speed);
    const sb = need(this.s, src.backend, 'snapshot.create');
    if (!sb.capabilities.limits('data.read')?.snapshots || !sb.backend.openSnapshot) {
      throw new Unsupported(`${src.backend} (${sb.backend.kind}) cannot read a snapshot through its data path, which a backup reads (a point in time of ${source})`, {
        ref: source, hint: 'back up from a backend that reports data.read with snapshots',
      });
    }
    need(this.s, dst.backend, 'snapshot.create');
    need(this.s, dst.backend, 'data.write');
    await this.a.assertOwns(src);
    const existing = await this.v.volumes.get(target).catch((e: unknown) => {
      if (e instanceof NotFound) return undefined;
      throw e;
    });
    if (existing) await this.a.assertOwns(dst);
    const points = existing ? await this.points(target) : [];
    if (existing && points.length === 0) {
      throw new AlreadyExists(`${target} exists and is not a backup (it has no points b1, b2, …): a backup would overwrite it`, {
        ref: target, hint: 'name a new volume for the backup',
      });
    }
    const last = points[points.length - 1]?.point ?? 0;
    const id = createHash('sha256').update(target).digest('hex').slice(0, 8);
    const marker = (n: number) => `bk-${id}-${n}`;
    const sourceSnaps = await this.v.snapshots.list(source);
    // Only the changes when the source can say what they are and the backup volume can be put
    // back to the previous point first; a full copy otherwise.
    const hasLast = last > 0 && sourceSnaps.some((x) => x.name === marker(last));
    const base = hasLast && sb.capabilities.has('data.dirty') && this.s.entry(dst.backend).capabilities.has('snapshot.revert') ? marker(last) : undefined;
    // The new point's marker: a leftover of an attempt that died is not this point in time.
    const next = marker(last + 1);
    const plan = planOrRefuse(this.s, { op: 'copy', source: `${source}@${next}`, target }, `back up ${source} to ${target}`, source);
    if (sourceSnaps.some((x) => x.name === next)) await this.v.snapshots.delete(`${source}@${next}`);
    const taken = await this.v.snapshots.create(`${source}@${next}`);
    const params: BackupParams = {
      source, target, point: last + 1, marker: next, sizeBytes: taken.sizeBytes, owner: existing?.owner ?? this.a.ownerFor(undefined),
      ...(base !== undefined ? { base } : {}), ...(last > 0 ? { previous: last } : {}),
      ...(hasLast && base === undefined ? { previousMarker: marker(last) } : {}),
    };
    const locks = [
      { key: snapshotKey(parseRef(`${source}@${next}`) as SnapshotRef), mode: 'shared' as const },
      ...(base !== undefined ? [{ key: snapshotKey(parseRef(`${source}@${base}`) as SnapshotRef), mode: 'exclusive' as const }] : []),
      { key: volumeKey(dst), mode: 'exclusive' as const },
    ];
    this.s.assertOpen();
    try {
      return await this.s.mutex.run(locks.map((l) => l.key), () => this.s.jobs.start({
        task: backupTask(params, this.s.backupDeps()), ref: target, executor: 'host', principal: this.a.principal, locks, plan, ...(speed ? { speed } : {}),
        // The source's point was taken under its lock (Snapshots.create checks there); the backup volume is checked again under the job's.
        ...(existing ? { check: () => this.a.assertOwns(dst) } : {}),
      }));
    } catch (e) {
      await this.v.snapshots.delete(`${source}@${next}`).catch(() => undefined);
      throw e;
    }
  }

  async list(targetText: string): Promise<BackupPoint[]> {
    const ref = parseVolumeRef(targetText);
    return this.points(`${ref.backend}/${ref.volume}`);
  }

  async restore(pointText: string, opts: { to: string; speed?: number }): Promise<Job> {
    if (opts === null || typeof opts !== 'object' || typeof opts.to !== 'string') throw new InvalidArgument('restore takes { to: "backend/volume", speed? }');
    const ref = parseRef(pointText);
    const target = `${ref.backend}/${ref.volume}`;
    const points = await this.points(target);
    const want = isSnapshotRef(ref) ? points.find((p) => p.ref === pointText) : points[points.length - 1];
    if (!want) {
      throw new NotFound(isSnapshotRef(ref) ? `${pointText} is not a point of the backup ${target}` : `the backup ${target} has no points yet`, {
        ref: pointText, hint: `list them with \`offload backups ${target}\``,
      });
    }
    const to = parseVolumeRef(opts.to);
    const dest = `${to.backend}/${to.volume}`;
    const b = this.s.entry(to.backend).backend;
    const exists = await call(b, 'get', dest, () => b.getVolume(to.volume));
    const speed = opts.speed !== undefined ? { speed: opts.speed } : {};
    if (exists) return this.v.copy(want.ref, dest, speed);
    const started = await this.v.startClone(want.ref, dest, { mode: 'full', prefer: 'host', ...speed });
    if (!started.job) throw new FailedPrecondition(`restoring ${want.ref} into ${dest} did not run as a job`, { ref: dest });
    return started.job;
  }

  /** The points of a backup volume, oldest first. */
  private async points(target: string): Promise<BackupPoint[]> {
    const snaps: Snapshot[] = await this.v.snapshots.list(target);
    return snaps.flatMap((x) => {
      const m = POINT.exec(x.name);
      return m ? [{ ref: `${target}@${x.name}`, point: Number(m[1]), sizeBytes: x.sizeBytes, ...(x.createdAt ? { createdAt: x.createdAt } : {}) }] : [];
    }).sort((a, b) => a.point - b.point);
  }
}
