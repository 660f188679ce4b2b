import { ContainerModule } from 'inversify';
import { BackendFactory, CliContribution } from '../../core/index.js';
import { imgCliContribution } from './cli/index.js';
import { qcow2Factory } from './factory.js';
import { poolCliContribution } from './pool/cli.js';

/** The qcow2 plugin: binds its CLI contributions (`offload img …`, `offload pool check`) and its BackendFactory (the local pool). */
export const qcow2Module = new ContainerModule(({ bind }) => {
  bind(CliContribution).toConstantValue(imgCliContribution);
  bind(BackendFactory).toConstantValue(qcow2Factory);
  bind(CliContribution).toConstantValue(poolCliContribution);
});
