/**
 * What the CLI's commands and both ends of the wire need to know about a broker behind a service,
 * without loading either end (the server's Fastify, the client's HTTP code).
 */
import type { Broker } from '../broker-api.js';

const SERVICE = Symbol.for('offload/service-address');

/** An administrator acts as a tenant by naming it in this header (the client's `broker.as(tenant(id))`). */
export const AS_HEADER = 'offload-as';

/** Mark a broker as the client of the service at `address`. */
export function markRemote(broker: Broker, address: string): void {
  Object.defineProperty(broker, SERVICE, { value: address });
}

/** The service a broker sends its verbs to (`unix:PATH`, `http://HOST:PORT`); undefined for an embedded broker. */
export function serviceOf(broker: Broker): string | undefined {
  return (broker as unknown as Record<symbol, string | undefined>)[SERVICE];
}
