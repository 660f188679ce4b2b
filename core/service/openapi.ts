/** /openapi.json: the control API described from the route table's own schemas (zod 4's JSON Schema). */
import { z } from 'zod';
import { ROUTES, type Route } from './routes.js';
import { errorSchema, noBody } from './schemas.js';

type JsonSchema = Record<string, unknown>;

function jsonSchema(schema: z.ZodType, io: 'input' | 'output'): JsonSchema {
  const { $schema: _, ...rest } = z.toJSONSchema(schema, { io, unrepresentable: 'any' }) as JsonSchema;
  return rest;
}

/** Path or query parameters from an object schema. */
function parameters(schema: z.ZodType, where: 'path' | 'query'): JsonSchema[] {
  const js = jsonSchema(schema, 'input') as { properties?: Record<string, JsonSchema>; required?: string[] };
  return Object.entries(js.properties ?? {}).map(([name, s]) => ({
    name, in: where, required: where === 'path' || (js.required ?? []).includes(name), schema: s,
  }));
}

function operation(id: string, r: Route): JsonSchema {
  const error = { description: 'an OffloadError: { error: { code, message, ref?, hint?, data? } }', content: { 'application/json': { schema: jsonSchema(errorSchema, 'output') } } };
  return {
    operationId: id,
    summary: r.summary,
    parameters: [...parameters(r.params, 'path'), ...parameters(r.query, 'query')],
    ...(r.body === noBody ? {} : {
      requestBody: { required: !r.body.safeParse(undefined).success, content: { 'application/json': { schema: jsonSchema(r.body, 'input') } } },
    }),
    responses: r.response === null
      ? { 204: { description: 'done' }, default: error }
      : { 200: { description: 'OK', content: { 'application/json': { schema: jsonSchema(r.response, 'output') } } }, default: error },
  };
}

export function openApiDocument(version: string): JsonSchema {
  const paths: Record<string, Record<string, JsonSchema>> = {};
  for (const [id, r] of Object.entries(ROUTES) as [string, Route][]) {
    const path = r.path.replace(/:(\w+)/g, '{$1}');
    (paths[path] ??= {})[r.method.toLowerCase()] = operation(id, r);
  }
  paths['/metrics'] = { get: { operationId: 'metrics', summary: 'Prometheus metrics (administrators)', responses: { 200: { description: 'Prometheus text format', content: { 'text/plain': {} } } } } };
  return {
    openapi: '3.1.0',
    info: {
      title: 'Offload Broker control API',
      version,
      description: 'Every broker verb over HTTP + JSON. On the unix socket every request acts as the administrator; over TCP every request needs `Authorization: Bearer TOKEN`.',
    },
    components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
    security: [{ bearer: [] }],
    paths,
  };
}
