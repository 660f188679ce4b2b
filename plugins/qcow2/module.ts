import { ContainerModule } from 'inversify';
import { BackendFactory, CliContribution } from '../../core/index.js';
import { imgCliContribution } from './cli/index.js';
import { qcow2Factory } from './factory.js';

/** The qcow2 plugin: binds its CLI contribution (`offload img …`) and its BackendFactory. */
export const qcow2Module = new ContainerModule(({ bind }) => {
  bind(CliContribution).toConstantValue(imgCliContribution);
  bind(BackendFactory).toConstantValue(qcow2Factory);
});
