import { ContainerModule } from 'inversify';

/** The ontap plugin: binds its BackendFactory and CLI contributions. (Being built.) */
export const ontapModule = new ContainerModule(() => {});
