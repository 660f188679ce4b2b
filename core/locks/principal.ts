/** Who is asking. Administrators manage everything; a tenant acts on what it owns. */
export interface Principal {
  id: string;
  role: 'admin' | 'tenant';
}

export const ADMIN: Principal = Object.freeze({ id: 'admin', role: 'admin' });

export function tenant(id: string): Principal {
  return { id, role: 'tenant' };
}
