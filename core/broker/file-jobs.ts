/**
 * `volume export|import` for one principal: every input checked before anything runs (typed
 * errors), the plan, and a host job that holds a lock on the volume (shared to export, exclusive
 * to import, as a copy's source and target) and one on the file (exclusive to write it, shared to
 * read it), so two exports never write one file and nothing writes a file being imported.
 */
import { constants } from 'node:fs';
import { access, realpath, stat } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import type { FileFormat } from '../backend/file-format.js';
import { fileError } from '../backend/raw-file.js';
import type { FileExportOptions, FileImportOptions, VolumesApi } from '../broker-api.js';
import { exportTask, importTask, tooLarge, type FileExportParams, type FileImportParams } from '../copy/file-copy.js';
import type { Job } from '../jobs/job.js';
import type { JobTask } from '../jobs/job-task.js';
import type { LockRequest } from '../locks/lock-manager.js';
import { AlreadyExists, InvalidArgument, NotFound, PermissionDenied } from '../model/errors.js';
import { formatRef, isSnapshotRef, parseRef, parseVolumeRef, volumeKey, type Ref } from '../model/refs.js';
import type { Plan } from '../planner/plan.js';
import type { Access } from './access.js';
import { checkSize, checkSpeed, planOrRefuse, readerWithin, readLocks } from './operation.js';
import { call, type BrokerState } from './state.js';

/** The export and import verbs of one principal's broker view (exposed on `broker.volumes`). */
export class FileJobs {
  constructor(private readonly s: BrokerState, private readonly a: Access, private readonly volumes: Pick<VolumesApi, 'get'>) {}

  async exportTo(refText: string, file: string, opts: FileExportOptions = {}): Promise<Job> {
    const ref = parseRef(refText);
    const source = formatRef(ref);
    const path = absolutePath(file, 'export');
    const format = this.s.formats.get(opts.format ?? 'raw', 'export format');
    const speed = checkSpeed(opts.speed);
    const plan = planOrRefuse(this.s, { op: 'export', source, file: path, format: format.name }, `export ${source} to ${path}`, source);
    await this.a.assertOwns(ref);
    await this.mustExist(ref);
    await checkNewFile(path, opts.overwrite === true);
    await format.checkCreate?.(path);
    const params: FileExportParams = { source, file: path, format: format.name, ...(opts.overwrite ? { overwrite: true } : {}), ...(opts.verify ? { verify: true } : {}) };
    return this.start(exportTask(params, this.s.fileJobDeps()), source, [
      ...readLocks(ref),
      { key: await fileKey(path), mode: 'exclusive' },
    ], plan, speed, () => this.a.assertOwns(ref));
  }

  async importFrom(file: string, refText: string, opts: FileImportOptions = {}): Promise<Job> {
    const ref = parseVolumeRef(refText);
    const target = volumeKey(ref);
    const path = absolutePath(file, 'import');
    const given = opts.format === undefined ? undefined : this.s.formats.get(opts.format, 'import format');
    const speed = checkSpeed(opts.speed);
    if (opts.owner !== undefined && !opts.create) throw new InvalidArgument(`import into ${target}: an owner is given to a volume the import creates (--create)`, { ref: target });
    const b = this.s.entry(ref.backend);
    await checkExistingFile(path);
    const format = given ?? (await this.s.formats.probe(path));
    const size = await virtualSize(format, path);
    const existing = await call(b.backend, 'get', target, () => b.backend.getVolume(ref.volume));
    if (!opts.create) {
      if (!existing) throw new NotFound(`volume ${target} does not exist`, { ref: target, hint: 'create it first, or import with --create to make it with the file\'s size' });
      await this.a.assertOwns(ref);
    }
    // With create, a volume that is there and ours is imported into as it is; someone else's is AlreadyExists (targetOwner).
    const into = existing !== undefined && (await this.a.mayAccess(ref));
    if (into && size > existing.sizeBytes) throw tooLarge(path, size, target, existing.sizeBytes);
    const plan = planOrRefuse(this.s, { op: 'import', file: path, target, create: !into }, `import ${path} into ${target}`, target);
    let create: FileImportParams['create'];
    if (!into) {
      const sizeBytes = checkSize(size, target, b.capabilities);
      create = { sizeBytes, owner: await this.a.targetOwner(ref, b.backend, this.a.ownerFor(opts.owner), opts.owner !== undefined) };
    }
    const params: FileImportParams = { file: path, format: format.name, target, ...(opts.verify ? { verify: true } : {}), ...(create ? { create } : {}) };
    return this.start(importTask(params, this.s.fileJobDeps()), target, [
      { key: target, mode: 'exclusive' },
      { key: await fileKey(path), mode: 'shared' },
    ], plan, speed, async () => {
      if (into || !opts.create) await this.a.assertOwns(ref);
    });
  }

  /** NotFound for a volume or snapshot that is not there (or not this principal's). */
  private async mustExist(ref: Ref): Promise<void> {
    const vol = await this.volumes.get(volumeKey(ref));
    if (!isSnapshotRef(ref)) return;
    const b = this.s.entry(ref.backend).backend;
    const text = formatRef(ref);
    const snaps = await call(b, 'list snapshots of', text, () => b.listSnapshots(vol.name));
    if (!snaps.some((x) => x.name === ref.snapshot)) throw new NotFound(`snapshot ${text} does not exist`, { ref: text, hint: `list them with \`offload snapshot list ${volumeKey(ref)}\`` });
  }

  /** `check`: the tenant's ownership again, once the job's locks are held (StartJobRequest.check). */
  /** An export to a file of a point of a disk in use works within what it is in use through (readerWithin). */
  private async start(task: JobTask, ref: string, locks: LockRequest[], plan: Plan, speed: number | undefined, check: () => Promise<void>): Promise<Job> {
    this.s.assertOpen();
    const within = await readerWithin(this.s, locks);
    return this.s.mutex.run(locks.map((l) => l.key), () =>
      this.s.jobs.start({ task, ref, executor: 'host', principal: this.a.principal, locks, plan, check, ...(speed ? { speed } : {}), ...(within.length > 0 ? { within } : {}) }));
  }
}

/** The file as an absolute path (a relative one resolves against the working folder). */
function absolutePath(file: unknown, verb: string): string {
  if (typeof file !== 'string' || file === '' || file.includes('\0')) {
    throw new InvalidArgument(`${verb}: the file must be a non-empty path, got ${JSON.stringify(file) ?? String(file)}`);
  }
  return resolve(file);
}

/** The lock key of a file: its real path (two names of one file are one lock). */
async function fileKey(path: string): Promise<string> {
  const real = await realpath(path).catch(async () => join(await realpath(dirname(path)).catch(() => dirname(path)), basename(path)));
  return `file:${real}`;
}

/** An export's target: a new file in a folder we may write (or, with overwrite, a regular file to replace). */
async function checkNewFile(path: string, overwrite: boolean): Promise<void> {
  const st = await stat(path).catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') return undefined;
    throw fileError(e, path, 'look at');
  });
  if (st?.isDirectory()) throw new InvalidArgument(`${path} is a directory`, { ref: path, hint: 'name the image file to create' });
  if (st && !st.isFile()) throw new InvalidArgument(`${path} is not a regular file`, { ref: path, hint: 'export into a regular file' });
  if (st && !overwrite) throw new AlreadyExists(`${path} already exists`, { ref: path, hint: 'choose another file, or replace it with --force' });
  const dir = dirname(path);
  const d = await stat(dir).catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') throw new NotFound(`folder ${dir} does not exist`, { ref: dir, hint: 'create it first, or export elsewhere' });
    throw fileError(e, dir, 'look at');
  });
  if (!d.isDirectory()) throw new InvalidArgument(`${dir} is not a folder`, { ref: dir });
  await access(st ? path : dir, constants.W_OK).catch(() => {
    throw new PermissionDenied(`${st ? path : `folder ${dir}`} is not writable by this user`, { ref: path, hint: 'export elsewhere, or fix its permissions' });
  });
}

/** An import's source: an existing, readable regular file. */
async function checkExistingFile(path: string): Promise<void> {
  const st = await stat(path).catch((e: unknown) => {
    throw fileError(e, path, 'import');
  });
  if (st.isDirectory()) throw new InvalidArgument(`${path} is a directory`, { ref: path, hint: 'name an image file' });
  if (!st.isFile()) throw new InvalidArgument(`${path} is not a regular file`, { ref: path, hint: 'import from an image file (block devices and pipes are not supported)' });
  await access(path, constants.R_OK).catch(() => {
    throw new PermissionDenied(`${path} is not readable by this user`, { ref: path });
  });
}

/** The guest size of an image file (opening it also proves it is readable in that format). */
async function virtualSize(format: FileFormat, path: string): Promise<number> {
  const dev = await format.open(path, 'r');
  try {
    return dev.sizeBytes;
  } finally {
    await dev.close();
  }
}
