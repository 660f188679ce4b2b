import type { ContainerModule } from 'inversify';
import { qcow2Module } from './qcow2/module.js';
import { flasharrayModule } from './flasharray/module.js';
import { ontapModule } from './ontap/module.js';

/** The built-in plugins, each one ContainerModule. `bin/offload` and the examples load these. */
export const builtinPlugins: readonly ContainerModule[] = [qcow2Module, flasharrayModule, ontapModule];
