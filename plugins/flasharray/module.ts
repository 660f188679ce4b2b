import { ContainerModule } from 'inversify';

/** The flasharray plugin: binds its BackendFactory and CLI contributions. (Being built.) */
export const flasharrayModule = new ContainerModule(() => {});
