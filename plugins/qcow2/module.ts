import { ContainerModule } from 'inversify';

/** The qcow2 plugin: binds its BackendFactory and CLI contributions. (Being built.) */
export const qcow2Module = new ContainerModule(() => {});
