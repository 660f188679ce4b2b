import { ontapModule } from '../../plugins/ontap/module.js';
import { startOntapMock } from '../../plugins/ontap/appliance/server.js';
import { describeBackendContract } from '../../testing/index.js';

describeBackendContract({
  name: 'ontap (mock NAS appliance on a loopback port)',
  setup: async () => {
    const mock = await startOntapMock({ port: 0, jobDurationMs: 20 });
    return {
      plugins: [ontapModule],
      backend: {
        name: 'nas1', kind: 'ontap', endpoint: mock.url, username: mock.username, password: mock.password, svm: 'svm0',
        pollIntervalMs: 5, pollMaxIntervalMs: 40, pollBudgetMs: 30_000,
        retry: { maxAttempts: 3, baseDelayMs: 5, maxDelayMs: 50 },
      },
      teardown: () => mock.close(),
    };
  },
});
