import { flasharrayModule } from '../../plugins/flasharray/module.js';
import { startFlashArrayMock } from '../../plugins/flasharray/appliance/index.js';
import { describeBackendContract } from '../../testing/index.js';

describeBackendContract({
  name: 'flasharray (mock array on a loopback port)',
  setup: async () => {
    const mock = await startFlashArrayMock({ port: 0 });
    return {
      plugins: [flasharrayModule],
      backend: { name: 'san1', kind: 'flasharray', endpoint: mock.url, apiToken: mock.apiToken, retry: { maxAttempts: 3, baseDelayMs: 5, maxDelayMs: 50 } },
      teardown: async () => {
        // The suite deletes all it made: delete = destroy + eradicate must leave nothing behind,
        // not even destroyed volumes pending eradication.
        const login = await fetch(`${mock.url}/api/2.26/login`, { method: 'POST', headers: { 'api-token': mock.apiToken } });
        const headers = { 'x-auth-token': login.headers.get('x-auth-token')! };
        const left: string[] = [];
        for (const resource of ['volumes', 'volume-snapshots']) {
          const r = await fetch(`${mock.url}/api/2.26/${resource}`, { headers });
          left.push(...((await r.json()) as { items: { name: string }[] }).items.map((i) => i.name));
        }
        await mock.close();
        if (left.length > 0) throw new Error(`the contract suite left objects on the array: ${left.join(', ')}`);
      },
    };
  },
});
