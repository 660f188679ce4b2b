import { ContainerModule } from 'inversify';
import { BackendFactory, CliContribution } from '../../core/index.js';
import { flasharrayCli } from './cli.js';
import { flasharrayFactory } from './factory.js';

/** The flasharray plugin: the `flasharray` backend kind and `offload appliance flasharray`. */
export const flasharrayModule = new ContainerModule(({ bind }) => {
  bind(BackendFactory).toConstantValue(flasharrayFactory);
  bind(CliContribution).toConstantValue(flasharrayCli);
});
