/**
 * Moving data between a volume and a local image file (`volume export|import`) as host jobs on
 * the one copier: export copies a volume (or snapshot) into a file it creates, import copies a
 * file's guest content into a volume (creating the volume when asked). Their params are plain
 * JSON with the file's absolute path and format, so a restarted broker rebuilds them and they
 * continue from their checkpoint.
 */
import { rm, stat } from 'node:fs/promises';
import type { BlockDevice } from '../backend/block-device.js';
import type { FileFormat } from '../backend/file-format.js';
import { closeAfter, leftForNextRun } from '../jobs/job-run.js';
import type { JobContext, JobTask } from '../jobs/job-task.js';
import { AlreadyExists, FailedPrecondition, isOffloadError, OutOfRange } from '../model/errors.js';
import { copyData } from './copier.js';
import { cloneTask, type CloneDeps, type DeviceOpener } from './host-copy.js';

export interface FileExportParams extends Record<string, unknown> {
  /** The volume or snapshot ref read. */
  source: string;
  /** Absolute path of the file written. */
  file: string;
  /** Its format's name. */
  format: string;
  /** Replace the file if it exists. */
  overwrite?: boolean;
  /** Compare checksums of source and file after the copy. */
  verify?: boolean;
}

export interface FileImportParams extends Record<string, unknown> {
  /** Absolute path of the file read. */
  file: string;
  /** Its format's name (probed when the job was started, if not given). */
  format: string;
  /** The volume written. */
  target: string;
  verify?: boolean;
  /** The job creates the target (absent: it exists), with this size and owner. */
  create?: { sizeBytes: number; owner: string };
}

/** What the file jobs need from the broker. */
export interface FileJobDeps {
  /** Opens a ref's data path. */
  open: DeviceOpener;
  /** The format called `name` (InvalidArgument when the broker no longer knows it). */
  format(name: string): FileFormat;
  /** Creating and removing a volume, for an import that creates its target. */
  volumes: CloneDeps;
}

/** Which file an export made: device and inode, so a resumed run never writes into a file that replaced it. */
interface ExportState { creating?: boolean; file?: string }

async function identity(path: string): Promise<string | undefined> {
  const st = await stat(path, { bigint: true }).catch(() => undefined);
  return st ? `${st.dev}:${st.ino}` : undefined;
}

/**
 * Export as a JobTask: create the file (sized as the source) and copy the source's data into it,
 * leaving holes where the source has none. The file is recorded (device, inode) before anything
 * is copied; each checkpoint is saved only after the file is flushed (a qcow2 file's metadata
 * included). A resumed run goes on writing the file it made; failed or cancelled, it removes it.
 */
export function exportTask(params: FileExportParams, deps: FileJobDeps): JobTask {
  return { type: 'export', params, run: (ctx) => runExport(params, deps, ctx) };
}

async function runExport(params: FileExportParams, deps: FileJobDeps, ctx: JobContext): Promise<void> {
  const fmt = deps.format(params.format);
  const was = (ctx.resumeFrom ?? {}) as ExportState;
  const src = await deps.open(params.source, 'r');
  let dst: BlockDevice | undefined;
  let ours: string | undefined;
  try {
    const now = await identity(params.file);
    let resumed = false;
    if (was.file !== undefined && now === was.file) {
      dst = await fmt.open(params.file, 'rw');
      ours = now;
      resumed = true;
      if (dst.sizeBytes < src.sizeBytes) {
        throw new FailedPrecondition(`${params.source} grew from ${dst.sizeBytes} to ${src.sizeBytes} bytes while the export to ${params.file} was stopped`, {
          ref: params.source, hint: 'export again (with --force to replace the file)',
        });
      }
    } else {
      await ctx.saveState({ creating: true } satisfies ExportState);
      try {
        dst = await fmt.create(params.file, src.sizeBytes, { overwrite: params.overwrite === true });
      } catch (e) {
        // Stopped between creating the file and recording it, a run cannot tell whether the file is its own.
        if (isOffloadError(e, 'AlreadyExists') && (was.creating === true || was.file !== undefined)) {
          throw new AlreadyExists(`${params.file} already exists; it may be the file this export was writing when it stopped, or one that replaced it`, {
            ref: params.file, hint: 'check it, delete it and export again (or export with --force to replace it)',
          });
        }
        throw e;
      }
      ours = await identity(params.file);
      await ctx.saveState({ file: ours } satisfies ExportState);
    }
    const target = dst;
    const undo = ctx.beforeSave(() => target.flush());
    try {
      await copyData(src, target, ctx, {
        targetFresh: true, verify: params.verify === true, state: { file: ours },
        // A file made by this run starts from zero, whatever an earlier run's checkpoint says.
        ...(resumed ? {} : { startAt: 0 }),
      });
    } finally {
      undo();
    }
  } catch (e) {
    if (ours !== undefined && !leftForNextRun(e, ctx)) {
      await dst?.close().catch(() => undefined);
      dst = undefined;
      if ((await identity(params.file)) === ours) await rm(params.file, { force: true }).catch(() => undefined);
    }
    throw e;
  } finally {
    // Writing nothing more (its held metadata dropped) once another runner may write the file.
    await Promise.allSettled([src.close(), dst?.close(closeAfter(ctx))]);
  }
}

/**
 * Import as a JobTask: copy a file's guest content into an existing volume (every byte of it:
 * where the file has holes the volume is made zero), or into a volume the job creates with the
 * file's size (removed again when the job fails or is cancelled, as a clone's target is).
 */
export function importTask(params: FileImportParams, deps: FileJobDeps): JobTask {
  const openFile = () => deps.format(params.format).open(params.file, 'r');
  if (params.create) {
    const open: DeviceOpener = (ref, mode) => (ref === params.file ? openFile() : deps.open(ref, mode));
    const clone = cloneTask(
      { source: params.file, target: params.target, targetFresh: true, sizeBytes: params.create.sizeBytes, owner: params.create.owner, ...(params.verify ? { verify: true } : {}) },
      { ...deps.volumes, open },
      { type: 'import', what: 'an import that creates its volume', hint: 'import into it without --create, or choose another name' },
    );
    return { type: 'import', params, run: (ctx) => clone.run(ctx) };
  }
  return {
    type: 'import',
    params,
    async run(ctx) {
      const src = await openFile();
      let dst: BlockDevice | undefined;
      try {
        dst = await deps.open(params.target, 'rw');
        if (src.sizeBytes > dst.sizeBytes) throw tooLarge(params.file, src.sizeBytes, params.target, dst.sizeBytes);
        await copyData(src, dst, ctx, { targetFresh: false, verify: params.verify === true });
      } finally {
        await Promise.allSettled([src.close(), dst?.close()]);
      }
    },
  };
}

/** The file holds more than the volume can take. */
export function tooLarge(file: string, fileSize: number, target: string, volumeSize: number): OutOfRange {
  return new OutOfRange(`${file} (virtual size ${fileSize} bytes) is larger than ${target} (${volumeSize} bytes)`, {
    ref: target, hint: `grow the volume first (\`offload volume resize ${target} ${fileSize}\`), or import into a new volume with --create`,
  });
}
