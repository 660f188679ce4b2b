import { ContainerModule } from 'inversify';
import { CliContribution } from '../../core/index.js';
import { imgCliContribution } from './cli/index.js';

/** The qcow2 plugin: binds its CLI contribution (`offload img …`) and its BackendFactory. */
export const qcow2Module = new ContainerModule(({ bind }) => {
  bind(CliContribution).toConstantValue(imgCliContribution);
  // The `qcow2` BackendFactory (the local pool) is bound here once it exists:
  // bind(BackendFactory).toConstantValue(qcow2BackendFactory);
});
