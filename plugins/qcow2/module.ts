import { ContainerModule } from 'inversify';
import { BackendFactory, CliContribution, FileFormat } from '../../core/index.js';
import { imgCliContribution } from './cli/index.js';
import { qcow2Factory } from './factory.js';
import { qcow2FileFormat, engineRawFormat } from './file-formats.js';
import { poolCliContribution } from './pool/cli.js';

/**
 * The qcow2 plugin: binds its CLI contributions (`offload img …`, `offload pool check`), its
 * BackendFactory (the local pool) and its image file formats for `volume export|import` (qcow2,
 * and a raw that replaces core's).
 */
export const qcow2Module = new ContainerModule(({ bind }) => {
  bind(CliContribution).toConstantValue(imgCliContribution);
  bind(BackendFactory).toConstantValue(qcow2Factory);
  bind(CliContribution).toConstantValue(poolCliContribution);
  bind(FileFormat).toConstantValue(qcow2FileFormat);
  bind(FileFormat).toConstantValue(engineRawFormat);
});
