import { accessSync, constants, statSync } from 'node:fs';
import { resolve } from 'node:path';
import { InvalidArgument, NotFound, PermissionDenied, type BackendEnvironment, type BackendFactory, type StorageBackend } from '../../core/index.js';
import { Qcow2PoolConfig } from './config.js';
import { Qcow2Pool } from './pool/pool-backend.js';

/** Builds `qcow2` backends (local pools) from config entries. The pool folder must already exist. */
export const qcow2Factory: BackendFactory<Qcow2PoolConfig> = {
  kind: 'qcow2',
  description: 'local pool of qcow2 files: snapshots, linked and full clones, stream and commit run natively on the host',
  configSchema: Qcow2PoolConfig,
  async create(config: Qcow2PoolConfig, env: BackendEnvironment): Promise<StorageBackend> {
    const dir = resolve(env.baseDir, config.path);
    checkPoolDir(dir, config.name);
    return new Qcow2Pool({
      name: config.name, dir, format: config.format, clusterSize: config.clusterSize,
      allowBackingOutsidePool: config.allowBackingOutsidePool, logger: env.logger,
    });
  },
};

/** A missing or read-only pool folder is a config error, reported before anything runs. */
function checkPoolDir(dir: string, name: string): void {
  let isDir: boolean;
  try {
    isDir = statSync(dir).isDirectory();
  } catch {
    throw new NotFound(`backend ${name}: pool folder ${dir} does not exist`, { ref: dir, hint: `create it (mkdir -p ${dir}) or fix \`path\`` });
  }
  if (!isDir) throw new InvalidArgument(`backend ${name}: pool path ${dir} is not a folder`, { ref: dir, hint: 'point `path` at a folder' });
  try {
    accessSync(dir, constants.R_OK | constants.W_OK | constants.X_OK);
  } catch {
    throw new PermissionDenied(`backend ${name}: pool folder ${dir} is not writable by this user`, { ref: dir, hint: 'fix its permissions or point `path` elsewhere' });
  }
}
