import { InvalidArgument } from '../model/errors.js';

/** Who is asking. Administrators manage everything; a tenant acts on what it owns. */
export interface Principal {
  id: string;
  role: 'admin' | 'tenant';
  /**
   * The TLS clients (certificate common names or DNS:…/URI:… names, PSK identities) this principal's NBD exports
   * admit, and no others (a tokens file's `nbdClients`): a tenant's disks reach only its hosts.
   * Undefined: not bound.
   */
  nbdClients?: readonly string[];
}

export const ADMIN: Principal = Object.freeze({ id: 'admin', role: 'admin' });

/** A tenant principal. Its id cannot be `admin`: ownership records would not tell them apart. */
export function tenant(id: string): Principal {
  if (typeof id !== 'string' || id.length === 0 || id === ADMIN.id) {
    throw new InvalidArgument(`invalid tenant id ${JSON.stringify(id)}: a non-empty name other than "${ADMIN.id}" is needed`);
  }
  return { id, role: 'tenant' };
}
