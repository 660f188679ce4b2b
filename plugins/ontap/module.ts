import { ContainerModule } from 'inversify';
import { BackendFactory, CliContribution } from '../../core/index.js';
import { ontapCli } from './cli.js';
import { ontapFactory } from './factory.js';

/** The ontap plugin: the `ontap` BackendFactory and the `offload appliance ontap` command. */
export const ontapModule = new ContainerModule(({ bind }) => {
  bind(BackendFactory).toConstantValue(ontapFactory);
  bind(CliContribution).toConstantValue(ontapCli);
});
