/**
 * bench/service.ts's floor for (c): the FlashArray plugin behind a bare Fastify server on a unix
 * socket, no broker — one process hop and one HTTP round trip per call, nothing else. Run as a
 * child: argv[2] the backend's config (JSON), argv[3] the socket; prints "ready" once it listens.
 */
import { rmSync } from 'node:fs';
import Fastify from 'fastify';
import { silentLogger } from '../core/index.js';
import { flasharrayFactory } from '../plugins/flasharray/index.js';

const [config, socket] = [process.argv[2]!, process.argv[3]!];
const b = await flasharrayFactory.create(flasharrayFactory.configSchema.parse(JSON.parse(config)), { stateDir: '/tmp', baseDir: '/tmp', logger: silentLogger });
rmSync(socket, { force: true });
const app = Fastify();
app.put<{ Params: { n: string } }>('/v/:n', async (req) => b.createVolume({ name: req.params.n, sizeBytes: 1 << 20 }));
app.put<{ Params: { n: string } }>('/s/:n', async (req) => b.createSnapshot(req.params.n, 's'));
app.delete<{ Params: { n: string } }>('/s/:n', async (req, reply) => reply.code(204).send(await b.deleteSnapshot(req.params.n, 's')));
app.delete<{ Params: { n: string } }>('/v/:n', async (req, reply) => reply.code(204).send(await b.deleteVolume(req.params.n)));
await app.listen({ path: socket });
process.stdout.write('ready\n');
process.on('SIGTERM', () => void app.close().then(() => process.exit(0)));
